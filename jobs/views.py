"""HTML pages and the JSON polling endpoint. Every view requires login and shows a user only
their own jobs: anything else is a 404, never a 403 that would confirm the job exists."""
from __future__ import annotations

from pathlib import Path
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from .archive import stream_tar, tar_size
from .forms import JobForm
from .models import Job, Status
from .submission import create_job

EVENTS_TAIL = 30


def _own_job(request: HttpRequest, job_id: UUID) -> Job:
    return get_object_or_404(Job, pk=job_id, owner=request.user)


def _artifact_path(job: Job) -> Path | None:
    if job.status != Status.SUCCEEDED or not job.artifact_dir:
        return None
    root = Path(settings.ARTIFACT_ROOT).resolve()
    path = (root / job.artifact_dir).resolve()
    if root not in path.parents or not path.is_dir():
        return None
    return path


def _detail_context(job: Job) -> dict:
    events = list(job.events.order_by("-id")[:EVENTS_TAIL])[::-1]
    results = job.results or {}
    return {"job": job, "events": events, "results": results,
            "metrics": results.get("evaluation", {}).get("metrics", []),
            "has_artifact": _artifact_path(job) is not None}


@login_required
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = Job.objects.filter(owner=request.user).only(
        "id", "name", "model_source", "recipe_name", "status", "created_at", "progress", "finished_at")[:200]
    return render(request, "jobs/list.html", {"jobs": jobs})


@login_required
@require_http_methods(["GET", "POST"])
def job_new(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = JobForm(request.POST, user=request.user)
        if form.is_valid():
            job = create_job(form.request)
            messages.success(request, "Job queued.")
            return redirect("job-detail", job_id=job.id)
    else:
        form = JobForm(user=request.user)
    return render(request, "jobs/new.html", {"form": form}, status=400 if form.errors else 200)


@login_required
@require_GET
def job_detail(request: HttpRequest, job_id: UUID) -> HttpResponse:
    job = _own_job(request, job_id)
    return render(request, "jobs/detail.html", _detail_context(job))


@login_required
@require_GET
def job_status(request: HttpRequest, job_id: UUID) -> JsonResponse:
    """Polled by the job page: the same partials the page renders, plus the raw state."""
    job = _own_job(request, job_id)
    context = _detail_context(job)
    return JsonResponse({
        "status": job.status,
        "progress": job.progress,
        "finished": job.is_finished,
        "progress_html": render_to_string("jobs/_progress.html", context, request=request),
        "results_html": render_to_string("jobs/_results.html", context, request=request),
    })


@login_required
@require_POST
def job_cancel(request: HttpRequest, job_id: UUID) -> HttpResponse:
    job = _own_job(request, job_id)
    outcome = Job.request_cancel(job.id)
    if outcome == Status.CANCELLED:
        messages.info(request, "Job cancelled.")
    elif outcome == Status.RUNNING:
        messages.info(request, "Cancelling: the job stops at the next layer boundary.")
    else:
        messages.warning(request, "The job had already finished.")
    return redirect("job-detail", job_id=job.id)


@login_required
@require_GET
def job_artifact(request: HttpRequest, job_id: UUID) -> StreamingHttpResponse:
    job = _own_job(request, job_id)
    path = _artifact_path(job)
    if path is None:
        raise Http404("this job has no artifact")
    name = f"compressor-{job.id}"
    response = StreamingHttpResponse(stream_tar(path, name), content_type="application/x-tar")
    response["Content-Disposition"] = f'attachment; filename="{name}.tar"'
    response["Content-Length"] = str(tar_size(path, name))
    return response
