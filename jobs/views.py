"""HTML pages and the JSON polling endpoint. Every view requires login and shows a user only
their own jobs: anything else is a 404, never a 403 that would confirm the job exists."""
from __future__ import annotations

import hashlib
import json
from html import escape  # Django's escape is this plus a lazy-string wrapper that cost a third of the list page
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.core.serializers.json import DjangoJSONEncoder
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_http_methods, require_POST

# jobs.charts is imported where a figure is drawn: it imports plotly, a second of start-up that most
# requests never need.
from .archive import artifact_path, stream_tar, tar_size
from .eta import estimate, human, stage_durations
from .forms import JobForm
from .hub_push import PushError, has_token, last_push, push_job
from .models import CalibrationUpload, Job, JobEvent, Status
from .results_view import results_table
from .storage import download_response, stored_object
from .submission import SubmissionError, create_job
from .uploads import UploadInUse, delete_upload, limit_text, resolve_source, store_request_upload

EVENTS_TAIL = 30
JOBS_PER_PAGE = 50
LIST_COLUMNS = ("id", "name", "model_source", "recipe_name", "status", "created_at")  # the cells of a row
CHART_CACHE_S = 3600
MAX_COMPARED = 50  # jobs drawn at once on the compare page (its plotly figures cost ~5 ms a job to build)
PARTS_VERSION = 1  # part of the parts' cache key: raise it when what they hold changes (matters with a shared cache)
_JSON_SCRIPT_ESCAPES = {ord(">"): "\\u003E", ord("<"): "\\u003C", ord("&"): "\\u0026"}  # as Django's json_script
_PLACEHOLDER_ID = "00000000-0000-0000-0000-000000000000"


def _own_job(request: HttpRequest, job_id: UUID) -> Job:
    return get_object_or_404(Job, pk=job_id, owner=request.user)


def _calibration_label(job: Job) -> str | None:
    """What the job calibrates on, as the user knows it (an upload by its file name); None when its
    recipe needs no calibration data."""
    from compression.recipe import Recipe, RecipeError

    try:
        if not Recipe.from_dict(job.recipe).needs_calibration:
            return None
    except RecipeError:
        return None
    source = str((job.calibration or {}).get("source") or "")
    if source.startswith(CalibrationUpload.SOURCE_PREFIX):
        upload = resolve_source(job.owner_id, source)
        return upload.label if upload else f"{source} (deleted upload)"
    return source or None


def _detail_context(job: Job, has_artifact: bool | None = None) -> dict:
    """What templates/jobs/_progress.html and _results.html are rendered from."""
    # newest first: what is happening now; only the shown columns, the time formatted here once
    events = [{"level": level, "stage": stage, "message": message,
               "time": timezone.localtime(created).strftime("%H:%M:%S")}
              for level, stage, message, created in JobEvent.objects.filter(job_id=job.id).order_by("-id")
              .values_list("level", "stage", "message", "created_at")[:EVENTS_TAIL]]
    results = job.results or {}
    metrics = results.get("evaluation", {}).get("metrics", [])
    if has_artifact is None:
        has_artifact = artifact_path(job) is not None or stored_object(job) is not None
    return {"job": job, "events": events, "results": results, "eta": _eta_seconds(job),
            "metrics": metrics, "table": results_table(metrics, results.get("model")),
            "has_artifact": has_artifact, "has_card": bool(results.get("model_card"))}


def _parts_key(job: Job, last_event: int | None, local_artifact: bool) -> str:
    """The cache key of a finished job's page parts: everything they are built from that can still
    change. A finished job's row is final (every transition in jobs.models.Job is a compare-and-set
    from an active status, and results, error and progress are written only by those), so its status
    and finish time stand for the row; what can still change is the event log (a push to the Hub adds
    events) and whether the artifact directory is still on disk. Progress and error are in the key
    as well, so even a row rewritten outside those transitions cannot be shown stale."""
    digest = hashlib.blake2b(repr((job.progress, job.error_type, job.error_message, job.cancel_requested))
                             .encode(), digest_size=8).hexdigest()
    finished = job.finished_at.timestamp() if job.finished_at else None
    return f"job-parts:{PARTS_VERSION}:{job.id}:{job.status}:{finished}:{last_event}:{int(local_artifact)}:{digest}"


def _page_parts(request: HttpRequest, job: Job) -> dict:
    """The job page's parts that only the job's state decides, rendered: the progress and results
    partials, the charts as JSON text and the model card's HTML. A finished job's parts are cached
    per process under `_parts_key` (a page view then costs a few small queries instead of rendering
    tables, a log and 200 events' worth of charts); an active job's are rendered on every request
    (its progress, log and time estimate change while it runs)."""
    local_artifact = artifact_path(job) is not None
    key = None
    if job.is_finished:
        last_event = JobEvent.objects.filter(job_id=job.id).order_by("-id").values_list("id", flat=True).first()
        key = _parts_key(job, last_event, local_artifact)
        parts = cache.get(key)
        if parts is not None:
            return parts
    context = _detail_context(job, local_artifact or stored_object(job) is not None)
    push_available = job.status == Status.SUCCEEDED and context["has_artifact"]
    parts = {"progress_html": render_to_string("jobs/_progress.html", context),
             "results_html": render_to_string("jobs/_results.html", context),
             "charts_json": json.dumps(_charts(job), cls=DjangoJSONEncoder),
             "card_html": _card_html(job) if context["has_card"] else "",
             "push_available": push_available, "last_push": last_push(job) if push_available else None}
    if key is not None:
        cache.set(key, parts, CHART_CACHE_S)
    return parts


def _json_script(json_text: str, element_id: str) -> str:
    """What Django's json_script filter makes of the value `json_text` encodes (the same escapes, so
    the text can never end the <script> element), from JSON text already serialized."""
    return (f'<script id="{element_id}" type="application/json">'
            f"{json_text.translate(_JSON_SCRIPT_ESCAPES)}</script>")


def _eta_seconds(job: Job) -> dict | None:
    """Time left from measured stage rates and an earlier run of the same settings (jobs/eta.py)."""
    from compression.recipe import Recipe, RecipeError

    if job.status != Status.RUNNING or not job.progress:
        return None
    earlier = (Job.objects.filter(owner_id=job.owner_id, status=Status.SUCCEEDED, model_source=job.model_source,
                                  recipe=job.recipe, evaluation=job.evaluation)
               .order_by("-finished_at").only("results").first())
    try:
        needs_calibration = Recipe.from_dict(job.recipe).needs_calibration
    except RecipeError:
        needs_calibration = True
    eta = estimate(job.progress, timezone.now(), needs_calibration=needs_calibration,
                   previous=stage_durations((earlier.results or {}).get("timings")) if earlier else None)
    if eta is None:
        return None
    return {**eta, "stage_text": human(eta["stage_s"]), "total_text": human(eta["total_s"]),
            "from_earlier_job": earlier is not None}


def _charts(job: Job) -> dict:
    """The job's plotly figures. Building them costs far more than the rest of the page (plotly
    validates every property), so they are cached per process, keyed by everything they are built
    from: the job's state and its newest compress event (a finished job's charts never change)."""
    events = JobEvent.objects.filter(job_id=job.id, stage="compress")
    last_event = JobEvent.objects.filter(job_id=job.id, stage__in=("compress", "finetune")).order_by(
        "-id").values_list("id", flat=True).first()  # fine-tune steps redraw the loss curve too
    key = f"job-charts:{job.id}:{job.status}:{job.finished_at and job.finished_at.timestamp()}:{last_event}"
    charts = cache.get(key)
    if charts is None:
        from .charts import layer_loss, recovery_bars

        metrics = (job.results or {}).get("evaluation", {}).get("metrics", [])
        losses = [data for data in events.order_by("id").values_list("data", flat=True)
                  if isinstance(data, dict) and "loss" in data]
        charts = {"recovery": recovery_bars(metrics) if metrics else None,
                  "layer_loss": layer_loss(losses) if losses else None, **_recovery_charts(job)}
        cache.set(key, charts, CHART_CACHE_S)
    return charts


def _card_html(job: Job) -> str:
    """The sanitised HTML of the job's model card, cached per process (the card of a job never changes)."""
    from compression.card.model_card import card_to_html

    key = f"job-card:{job.id}:{job.finished_at and job.finished_at.timestamp()}"
    html = cache.get(key)
    if html is None:
        html = card_to_html(job.results["model_card"])
        cache.set(key, html, CHART_CACHE_S)
    return html


def _recovery_charts(job: Job) -> dict:
    """Fine-tuning loss curve, per-layer reconstruction and AutoRound error (only for jobs that have them)."""
    from .charts import autoround_error, finetune_loss, reconstruction_error

    # values_list, not .only("data") on job.events: that re-reads each event's deferred job_id (a query per event)
    events = JobEvent.objects.filter(job_id=job.id)
    recon = list(events.filter(stage="compress", data__kind="reconstruction").order_by("id").values_list("data", flat=True))
    steps = list(events.filter(stage="finetune", data__kind="finetune").order_by("id").values_list("data", flat=True))
    if not steps:  # events trimmed or never stored: the results keep a thinned curve
        steps = ((job.results or {}).get("finetune") or {}).get("loss_curve") or []
    tuned = list(events.filter(stage="compress", data__kind="autoround").order_by("id").values_list("data", flat=True))
    compression = (job.results or {}).get("compression") or {}
    recon = recon or compression.get("reconstruction") or []
    tuned = tuned or compression.get("autoround") or []
    return {"finetune_loss": finetune_loss(steps) if steps else None,
            "reconstruction": reconstruction_error(recon) if recon else None,
            "autoround": autoround_error(tuned) if tuned else None}


@login_required
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    """The user's jobs, newest first, JOBS_PER_PAGE a page (`?page=N`; a bad number shows the
    nearest page). Only the columns the table shows are read: no results, recipe or progress JSON."""
    jobs = Job.objects.filter(owner=request.user).order_by("-created_at", "-id").values_list(*LIST_COLUMNS)
    page = Paginator(jobs, JOBS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "jobs/list.html", {"rows_html": _list_rows_html(page.object_list), "page": page})


def _truncate(text: str, length: int) -> str:
    """`text` cut to at most `length` characters, the last one an ellipsis when cut (as Django's
    Truncator.chars, without its per-call set-up)."""
    return text if len(text) <= length else text[:length - 1] + "…"


def _list_rows_html(rows) -> str:
    """The table's rows as HTML, built here rather than by the template engine (fifty rows of six
    cells were most of the page's cost): the link, name, model, recipe, status and creation time,
    every value escaped."""
    link = reverse("job-detail", args=[_PLACEHOLDER_ID])
    zone = timezone.get_current_timezone()
    html = []
    for job_id, name, model, recipe, status, created in rows:
        job_id = str(job_id)
        html.append(
            f'    <tr>\n      <td><a href="{escape(link.replace(_PLACEHOLDER_ID, job_id))}">'
            f"{escape(_truncate(name or job_id, 40))}</a></td>\n"
            f"      <td>{escape(_truncate(model, 50))}</td>\n      <td>{escape(recipe)}</td>\n"
            f'      <td><span class="status {escape(status)}">{escape(status)}</span></td>\n'
            f'      <td>{created.astimezone(zone).strftime("%Y-%m-%d %H:%M")}</td>\n    </tr>\n')
    return mark_safe("".join(html))


@login_required
@require_http_methods(["GET", "POST"])
def job_new(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = JobForm(request.POST, request.FILES, user=request.user, request=request)
        if form.is_valid():
            try:
                job = create_job(form.request)  # checks the active-job limit again, atomically
            except SubmissionError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, "Job queued.", extra_tags="job-queued")  # job_detail.js clears it
                return redirect("job-detail", job_id=job.id)
    else:
        form = JobForm(user=request.user)
    return render(request, "jobs/new.html", {"form": form}, status=400 if form.errors else 200)


@login_required
@require_GET
def job_detail(request: HttpRequest, job_id: UUID) -> HttpResponse:
    job = _own_job(request, job_id)
    parts = _page_parts(request, job)
    return render(request, "jobs/detail.html", {
        "job": job, "progress_html": mark_safe(parts["progress_html"]),
        "results_html": mark_safe(parts["results_html"]), "card_html": mark_safe(parts["card_html"]),
        "charts_script": mark_safe(_json_script(parts["charts_json"], "job-charts")),
        "push": {"available": parts["push_available"], "last": parts["last_push"],
                 "has_token": parts["push_available"] and has_token(request.user)},
        "calibration_label": _calibration_label(job)})  # the page header only, not the polled partials


@login_required
@require_GET
def job_status(request: HttpRequest, job_id: UUID) -> HttpResponse:
    """Polled by the job page: the same partials the page renders, plus the raw state. The charts'
    JSON text is spliced in as it was cached, not parsed and serialized again."""
    job = _own_job(request, job_id)
    parts = _page_parts(request, job)
    head = json.dumps({"status": job.status, "progress": job.progress, "finished": job.is_finished,
                       "progress_html": parts["progress_html"], "results_html": parts["results_html"]},
                      cls=DjangoJSONEncoder)
    return HttpResponse(f'{head[:-1]}, "charts": {parts["charts_json"]}}}', content_type="application/json")


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
    if (stored := download_response(job, f"compressor-{job.id}.tar")) is not None:
        return stored  # bucket: redirect to a presigned URL, or stream the object
    path = artifact_path(job)
    if path is None:
        raise Http404("this job has no artifact")
    name = f"compressor-{job.id}"
    response = StreamingHttpResponse(stream_tar(path, name), content_type="application/x-tar")
    response["Content-Disposition"] = f'attachment; filename="{name}.tar"'
    response["Content-Length"] = str(tar_size(path, name))
    return response


@login_required
@require_POST
def job_push(request: HttpRequest, job_id: UUID) -> HttpResponse:
    """The job page's push button: the same jobs.hub_push.push_job as POST /api/jobs/<id>/push."""
    job = _own_job(request, job_id)
    try:
        result = push_job(job, repo_id=request.POST.get("repo_id", ""), private=bool(request.POST.get("private")),
                          token=request.POST.get("token") or None,
                          remember_token=bool(request.POST.get("remember_token")), owner=request.user)
    except PushError as exc:
        messages.error(request, f"Not pushed — {exc.field}: {exc.message}")
    else:
        messages.success(request, f"Pushed {result.files} files to {result.url}")
    return redirect("job-detail", job_id=job.id)


@login_required
@require_GET
def job_card(request: HttpRequest, job_id: UUID) -> HttpResponse:
    job = _own_job(request, job_id)
    card = (job.results or {}).get("model_card")
    if not card:
        raise Http404("this job has no model card yet")
    response = HttpResponse(card, content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="README.md"'
    return response


SCORE_SETTINGS = ("tasks", "windows", "seqlen", "limit", "num_fewshot", "apply_chat_template", "data_source",
                  "max_length", "add_bos_token")


def evaluation_group(job: Job) -> tuple[str, str]:
    """(key, label) of the evaluation settings that change a job's scores: jobs are comparable only
    within one group."""
    import hashlib
    import json

    settings = ((job.results or {}).get("evaluation") or {}).get("settings") or job.evaluation or {}
    chosen = {k: settings.get(k) for k in SCORE_SETTINGS if settings.get(k) is not None}
    chosen["tasks"] = sorted(chosen.get("tasks") or [])
    key = hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:12]
    parts = [", ".join(chosen["tasks"]) or "no tasks"]
    if "wikitext2_ppl" in chosen["tasks"] and chosen.get("windows"):
        parts.append(f"perplexity {chosen['windows']}×{chosen['seqlen']} tokens" if chosen.get("seqlen")
                     else f"perplexity {chosen['windows']} windows")
    if chosen.get("limit") is not None:
        parts.append(f"limit {chosen['limit']}")
    if chosen.get("num_fewshot") is not None:
        parts.append(f"{chosen['num_fewshot']}-shot")
    if chosen.get("apply_chat_template"):
        parts.append("chat template")
    for extra in ("data_source", "max_length", "add_bos_token"):
        if chosen.get(extra) not in (None, "auto"):
            parts.append(f"{extra} {chosen[extra]}")
    return key, " · ".join(parts)


def compare_points(jobs: list[Job]) -> tuple[list[dict], list[dict]]:
    """(scatter points, bar groups) for the finished jobs of one base model: one colour per job,
    the recipe, and the evaluation group each job's numbers belong to."""
    from compression.evaluation.recovery import headline

    from .charts import job_colors

    points, groups = [], []
    colors = job_colors(len(jobs))
    for job, color in zip(jobs, colors):
        results = job.results or {}
        rows = results.get("evaluation", {}).get("metrics", [])
        head = headline(rows) or {}
        key, label = evaluation_group(job)
        size = results.get("size", {}).get("compressed_weight_bytes")
        name = job.display_name
        points.append({"name": name, "job_id": str(job.id), "color": color,
                       "recipe": job.recipe_name or "custom", "recipe_summary": results.get("recipe_summary") or "",
                       "recovery_pct": head.get("recovery_pct"), "recovery_kind": head.get("kind"),
                       "level": head.get("level"), "size_mb": size / 1e6 if size else None,
                       "speedup": (results.get("speed") or {}).get("speedup"),
                       "eval_key": key, "eval_label": label})
        groups.append({"name": name, "rows": rows, "color": color})
    return points, groups


COMPARE_COLUMNS = ("id", "name", "model_source", "recipe_name", "evaluation", "results", "created_at")


@login_required
@require_GET
def compare(request: HttpRequest) -> HttpResponse:
    """The user's succeeded jobs of one base model side by side. Jobs evaluated with other settings
    are not comparable: the page groups them (one Pareto front each), warns when several groups are
    shown, and filters by group and by name/recipe text. At most MAX_COMPARED jobs are drawn: more
    is a 400 that says how many matched and how to narrow them (the charts' cost grows with every job).
    The charts are cached per process under a digest of exactly what they are drawn from."""
    finished = Job.objects.filter(owner=request.user, status=Status.SUCCEEDED)
    models = list(finished.order_by("model_source").values_list("model_source", flat=True).distinct())
    model = request.GET.get("model") or (models[0] if models else "")
    jobs = list(finished.filter(model_source=model).order_by("created_at", "id").only(*COMPARE_COLUMNS)) \
        if model else []
    all_points, all_groups = compare_points(jobs)
    settings_groups: dict[str, dict] = {}
    for p in all_points:
        settings_groups.setdefault(p["eval_key"], {"key": p["eval_key"], "label": p["eval_label"], "count": 0})
        settings_groups[p["eval_key"]]["count"] += 1
    chosen = request.GET.get("eval") or ""
    text = (request.GET.get("q") or "").strip().lower()
    keep = [i for i, p in enumerate(all_points)
            if (not chosen or p["eval_key"] == chosen)
            and (not text or text in f"{p['name']} {p['recipe']} {p['recipe_summary']}".lower())]
    too_many = None
    if len(keep) > MAX_COMPARED:
        too_many = (f"{len(keep)} of your succeeded jobs on {model} match; the compare page draws at most "
                    f"{MAX_COMPARED} at once. Narrow them with the evaluation settings or the name/recipe filter.")
        keep = []
    points = [all_points[i] for i in keep]
    groups = [all_groups[i] for i in keep]
    shown_groups = {p["eval_key"] for p in points}
    charts_script = mark_safe(_json_script(_compare_charts_json(points, groups) if points else "null",
                                           "compare-charts"))
    return render(request, "jobs/compare.html", {
        "models": models, "model": model, "jobs": jobs, "points": points, "charts_script": charts_script,
        "settings_groups": list(settings_groups.values()), "eval": chosen, "q": request.GET.get("q") or "",
        "mixed_settings": len(shown_groups) > 1, "too_many": too_many, "max_compared": MAX_COMPARED},
        status=400 if too_many else 200)


def _compare_charts_json(points: list[dict], groups: list[dict]) -> str:
    """The compare charts as JSON text, cached under a digest of the points and bar groups they are
    drawn from (a new, changed or filtered-out job changes the digest: never stale)."""
    from .charts import compare_bars, compare_scatter

    digest = hashlib.sha256(json.dumps([points, groups], sort_keys=True, default=str).encode()).hexdigest()
    key = f"compare-charts:{PARTS_VERSION}:{digest}"
    charts_json = cache.get(key)
    if charts_json is None:
        charts_json = json.dumps({"scatter": compare_scatter(points), "bars": compare_bars(groups)},
                                 cls=DjangoJSONEncoder)
        cache.set(key, charts_json, CHART_CACHE_S)
    return charts_json


@login_required
@require_http_methods(["GET", "POST"])
def calibration_files(request: HttpRequest) -> HttpResponse:
    """The user's calibration uploads: list, upload (size-limited while streaming), delete."""
    error = None
    if request.method == "POST":
        try:
            upload = store_request_upload(request, request.user, "file")
        except SubmissionError as exc:
            error = exc.message
        else:
            messages.success(request, f"Uploaded {upload.filename}: {upload.records} records.")
            return redirect("calibration-files")
    uploads = CalibrationUpload.objects.filter(owner=request.user)[:500]
    return render(request, "calibration/list.html", {"uploads": uploads, "error": error, "max_size": limit_text()},
                  status=400 if error else 200)


@login_required
@require_POST
def calibration_delete(request: HttpRequest, upload_id: UUID) -> HttpResponse:
    upload = get_object_or_404(CalibrationUpload, pk=upload_id, owner=request.user)
    try:
        delete_upload(upload)
    except UploadInUse as exc:
        messages.error(request, f"{upload.filename} was not deleted: {exc}")
    else:
        messages.success(request, f"Deleted {upload.filename}.")
    return redirect("calibration-files")
