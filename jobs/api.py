"""The REST API: everything the browser does, scriptable. Token auth for scripts, session auth for
the browser; every endpoint needs a user, and a user sees only their own jobs (404 for anyone
else's, never a 403 that would confirm the job exists). Errors are JSON (jobs/api_errors.py)."""
from __future__ import annotations

import functools
import logging
import math
from typing import Any
from uuid import UUID

from django.db.models import QuerySet
from django.http import HttpResponse, StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.decorators import api_view, parser_classes
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.utils.urls import remove_query_param, replace_query_param

from .api_errors import error_response
from .archive import artifact_path, stream_tar, tar_size
from .models import CalibrationUpload, Job, Status
from .serializers import (CalibrationUploadListSerializer, CalibrationUploadRequestSerializer,
                          CalibrationUploadSerializer, CompareFilterSerializer, CompareSerializer, ErrorSerializer, EventFilterSerializer,
                          EventPageSerializer, EventSerializer, JobCreateSerializer, JobDetailSerializer,
                          JobFilterSerializer, JobPageSerializer, PresetListSerializer,
                          RecommendFilterSerializer, RecommendSerializer,
                          _links)
from .storage import download_response
from .submission import SubmissionError, create_job, recommend_for_model, validate_submission
from .uploads import UploadInUse, UploadTooLarge, delete_upload, store_request_upload

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
SUMMARY_FIELDS = ("id", "owner_id", "name", "model_source", "recipe_name", "status", "cancel_requested", "progress",
                  "error_type", "error_message", "created_at", "started_at", "finished_at")


def _own_jobs(request: Request) -> QuerySet[Job]:
    return Job.objects.filter(owner=request.user)


def _own_job(request: Request, job_id: UUID) -> Job:
    job = _own_jobs(request).filter(pk=job_id).first()
    if job is None:
        raise exceptions.NotFound("no job with this id")
    return job


def _query(serializer_class: type, request: Request) -> dict[str, Any]:
    """Validated query parameters; unknown or malformed ones are a 400 naming the parameter."""
    serializer = serializer_class(data=request.query_params.dict())
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


ERRORS = {
    400: OpenApiResponse(ErrorSerializer, description="Invalid input; each error names its field"),
    401: OpenApiResponse(ErrorSerializer, description="No or bad credentials"),
    403: OpenApiResponse(ErrorSerializer, description="Forbidden (e.g. a session request without CSRF token)"),
}
NOT_FOUND = {404: OpenApiResponse(ErrorSerializer, description="No such job among yours")}
JOB_ID = OpenApiParameter("job_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The job's id")
CREATE_EXAMPLES = [
    OpenApiExample("W4A16 preset", request_only=True, value={
        "model": "demo", "recipe": {"preset": "W4A16", "group_size": 64},
        "calibration": {"samples": 64, "seqlen": 256}, "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 4}}),
    OpenApiExample("YAML recipe", request_only=True, value={
        "model": "demo", "name": "fp8 by yaml",
        "recipe": {"yaml": "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
                           "      ignore: [lm_head]\n      scheme: FP8_DYNAMIC\n"}}),
]


# -- jobs ----------------------------------------------------------------------------------------
@extend_schema(methods=["GET"], operation_id="jobs_list", summary="List your jobs, newest first",
               parameters=[JobFilterSerializer], responses={200: JobPageSerializer, **ERRORS})
@extend_schema(methods=["POST"], operation_id="jobs_create", summary="Submit a job",
               description="Validated exactly as the web form (recipe, calibration, evaluation, pre-flight "
                           "against the model's config), then queued.",
               request=JobCreateSerializer, examples=CREATE_EXAMPLES,
               responses={201: JobDetailSerializer, **ERRORS})
@api_view(["GET", "POST"])
def jobs(request: Request) -> Response:
    return _create_job(request) if request.method == "POST" else _list_jobs(request)


def _list_jobs(request: Request) -> Response:
    query = _query(JobFilterSerializer, request)
    jobs = _own_jobs(request).only(*SUMMARY_FIELDS)
    if "status" in query:
        jobs = jobs.filter(status=query["status"])
    if "model" in query:
        jobs = jobs.filter(model_source=query["model"])
    limit, offset = query.get("limit", DEFAULT_PAGE_SIZE), query.get("offset", 0)
    count = jobs.count()
    page = list(jobs[offset:offset + limit]) if offset < count else []
    url = request.build_absolute_uri()
    next_url = replace_query_param(replace_query_param(url, "limit", limit), "offset", offset + limit) \
        if offset + limit < count else None
    previous_url = None
    if offset > 0:
        previous_url = replace_query_param(url, "limit", limit)
        previous_url = replace_query_param(previous_url, "offset", max(0, offset - limit)) \
            if offset - limit > 0 else remove_query_param(previous_url, "offset")
    results = [job_summary(job, request) for job in page]
    return Response({"count": count, "next": next_url, "previous": previous_url, "results": results})


def _datetime(value: Any, zone: Any = None) -> str | None:
    """As DRF's DateTimeField writes it: ISO 8601 in the current time zone (`zone`, looked up when not
    given), UTC as 'Z'."""
    if value is None:
        return None
    text = value.astimezone(zone or timezone.get_current_timezone()).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def job_summary(job: Job, request: Request) -> dict[str, Any]:
    """JobSummarySerializer's output (it stays the documented schema), built directly: the list
    endpoint renders up to 200 of these, and DRF's per-field machinery cost most of its time."""
    error = {"type": job.error_type, "message": job.error_message} if job.error_type or job.error_message else None
    zone = timezone.get_current_timezone()  # once, not per field: the lookup goes through a context-local
    return {"id": str(job.id), "name": job.name, "display_name": job.display_name, "model": job.model_source,
            "recipe_name": job.recipe_name, "status": job.status, "cancel_requested": job.cancel_requested,
            "progress": job.progress, "error": error, "created_at": _datetime(job.created_at, zone),
            "started_at": _datetime(job.started_at, zone), "finished_at": _datetime(job.finished_at, zone),
            "links": _links(job, request)}


def _create_job(request: Request) -> Response:
    if not isinstance(request.data, dict):
        raise exceptions.ValidationError("the body must be a JSON object")
    body = JobCreateSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    try:
        submission = validate_submission(request.user, **body.submission_kwargs())
        job = create_job(submission)  # checks the active-job limit again, atomically
    except SubmissionError as exc:
        field = None if exc.field == "non_field" else exc.field
        return error_response(status.HTTP_400_BAD_REQUEST, (field, exc.message))
    job.refresh_from_db()  # the queue may have refused it: report the state it is really in
    log.info("job %s submitted through the API by %s", job.id, request.user)
    headers = {"Location": reverse("api-job-detail", args=[job.id], request=request)}
    return Response(JobDetailSerializer(job, context={"request": request}).data,
                    status=status.HTTP_201_CREATED, headers=headers)


@extend_schema(operation_id="jobs_retrieve", summary="One job: state, progress, results, error",
               parameters=[JOB_ID], responses={200: JobDetailSerializer, **ERRORS, **NOT_FOUND})
@api_view(["GET"])
def job_detail(request: Request, job_id: UUID) -> Response:
    job = _own_job(request, job_id)
    return Response(JobDetailSerializer(job, context={"request": request}).data)


@extend_schema(operation_id="jobs_events", summary="The job's event log, oldest first",
               description="Tail a running job by passing the `last_id` of the previous answer as `after`.",
               parameters=[JOB_ID, EventFilterSerializer],
               responses={200: EventPageSerializer, **ERRORS, **NOT_FOUND})
@api_view(["GET"])
def job_events(request: Request, job_id: UUID) -> Response:
    job = _own_job(request, job_id)
    query = _query(EventFilterSerializer, request)
    after, limit = query["after"], query["limit"]
    # one extra row tells whether more are waiting without a second query
    events = list(job.events.filter(id__gt=after).order_by("id")[:limit + 1])
    more = len(events) > limit
    events = events[:limit]
    last_id = events[-1].id if events else (after or None)
    next_url = None
    if more:
        next_url = replace_query_param(request.build_absolute_uri(), "after", last_id)
    return Response({"results": EventSerializer(events, many=True).data, "last_id": last_id, "next": next_url})


@extend_schema(operation_id="jobs_cancel", summary="Cancel a job",
               description="A queued job is cancelled at once; a running one is asked to stop at its next layer "
                           "boundary (`cancel_requested` true, status still running). A finished job is a 409.",
               request=None, parameters=[JOB_ID],
               responses={200: JobDetailSerializer, **ERRORS, **NOT_FOUND,
                          409: OpenApiResponse(ErrorSerializer, description="The job had already finished")})
@api_view(["POST"])
def job_cancel(request: Request, job_id: UUID) -> Response:
    job = _own_job(request, job_id)
    outcome = Job.request_cancel(job.id)
    job.refresh_from_db()
    if outcome is None:
        return error_response(status.HTTP_409_CONFLICT,
                              ("status", f"the job has already finished ({job.status}); nothing to cancel"))
    log.info("cancel of job %s requested through the API (now %s)", job.id, outcome)
    return Response(JobDetailSerializer(job, context={"request": request}).data)


@extend_schema(operation_id="jobs_card", summary="The model card (Markdown)", parameters=[JOB_ID],
               responses={(200, "text/markdown"): OpenApiTypes.STR, **ERRORS,
                          404: OpenApiResponse(ErrorSerializer, description="No such job, or no card yet")})
@api_view(["GET"])
def job_card(request: Request, job_id: UUID) -> HttpResponse:
    job = _own_job(request, job_id)
    card = (job.results or {}).get("model_card")
    if not isinstance(card, str):
        raise exceptions.NotFound(f"this job has no model card yet (status: {job.status}); "
                                  "a card is written when a job succeeds")
    response = HttpResponse(card, content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = f'inline; filename="compressor-{job.id}-README.md"'
    return response


@extend_schema(operation_id="jobs_artifact", summary="Download the compressed checkpoint as a tar",
               parameters=[JOB_ID],
               responses={(200, "application/x-tar"): OpenApiTypes.BINARY, **ERRORS,
                          404: OpenApiResponse(ErrorSerializer, description="No such job, or no artifact")})
@api_view(["GET"])
def job_artifact(request: Request, job_id: UUID) -> StreamingHttpResponse:
    job = _own_job(request, job_id)
    if (stored := download_response(job, f"compressor-{job.id}.tar")) is not None:
        return stored  # bucket: redirect to a presigned URL, or stream the object
    path = artifact_path(job)
    if path is None:
        raise exceptions.NotFound(f"this job has no artifact (status: {job.status}); only a succeeded job has one")
    name = f"compressor-{job.id}"
    response = StreamingHttpResponse(stream_tar(path, name), content_type="application/x-tar")
    response["Content-Disposition"] = f'attachment; filename="{name}.tar"'
    response["Content-Length"] = str(tar_size(path, name))
    return response


# -- calibration files ---------------------------------------------------------------------------
@extend_schema(methods=["GET"], operation_id="calibration_files_list", summary="Your uploaded calibration files",
               responses={200: CalibrationUploadListSerializer, **ERRORS})
@extend_schema(methods=["POST"], operation_id="calibration_files_create", summary="Upload a calibration file",
               description="multipart/form-data with one `file`. The file is checked (suffix, UTF-8, records "
                           "with text) and kept; use its `source` (`upload:<id>`) as a job's calibration.source. "
                           "Files above `max_bytes` are refused while they stream in.",
               request={"multipart/form-data": CalibrationUploadRequestSerializer},
               responses={201: CalibrationUploadSerializer, **ERRORS,
                          413: OpenApiResponse(ErrorSerializer, description="The file is above the size limit"),
                          415: OpenApiResponse(ErrorSerializer, description="The body is not multipart/form-data")})
@api_view(["GET", "POST"])
@parser_classes([MultiPartParser])
def calibration_files(request: Request) -> Response:
    from django.conf import settings

    if request.method == "GET":
        uploads = CalibrationUpload.objects.filter(owner=request.user)[:500]
        return Response({"results": CalibrationUploadSerializer(uploads, many=True).data,
                         "max_bytes": settings.COMPRESSOR_MAX_UPLOAD_BYTES})
    files = request.FILES  # parses the body; the size limit applies while it streams in
    unknown = sorted(set(files) - {"file"}) + sorted(set(request.data) - set(files))
    if unknown:
        return error_response(status.HTTP_400_BAD_REQUEST, (unknown[0], "unknown field; allowed: file"))
    try:
        upload = store_request_upload(request._request, request.user, "file")
    except UploadTooLarge as exc:
        return error_response(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, (exc.field, exc.message))
    except SubmissionError as exc:
        return error_response(status.HTTP_400_BAD_REQUEST, (exc.field, exc.message))
    log.info("calibration file %s (%d bytes) uploaded by %s", upload.id, upload.size, request.user)
    return Response(CalibrationUploadSerializer(upload).data, status=status.HTTP_201_CREATED)


UPLOAD_ID = OpenApiParameter("upload_id", OpenApiTypes.UUID, OpenApiParameter.PATH,
                             description="The calibration file's id")


@extend_schema(methods=["GET"], operation_id="calibration_files_retrieve", summary="One uploaded calibration file",
               parameters=[UPLOAD_ID], responses={200: CalibrationUploadSerializer, **ERRORS,
                                                  404: OpenApiResponse(ErrorSerializer, description="Not yours")})
@extend_schema(methods=["DELETE"], operation_id="calibration_files_destroy", summary="Delete an uploaded file",
               description="Refused (409) while a queued or running job of yours calibrates on it.",
               parameters=[UPLOAD_ID],
               responses={204: None, **ERRORS, 404: OpenApiResponse(ErrorSerializer, description="Not yours"),
                          409: OpenApiResponse(ErrorSerializer, description="A queued or running job uses it")})
@api_view(["GET", "DELETE"])
def calibration_file(request: Request, upload_id: UUID) -> Response:
    upload = CalibrationUpload.objects.filter(pk=upload_id, owner=request.user).first()
    if upload is None:
        raise exceptions.NotFound("no calibration file with this id among yours")
    if request.method == "GET":
        return Response(CalibrationUploadSerializer(upload).data)
    try:
        delete_upload(upload)
    except UploadInUse as exc:
        return error_response(status.HTTP_409_CONFLICT, (None, str(exc)))
    return Response(status=status.HTTP_204_NO_CONTENT)


# -- presets and comparison ----------------------------------------------------------------------
@functools.cache
def _presets() -> list[dict[str, Any]]:
    from compression.recipe import PRESETS, Recipe

    presets = []
    for name, description in PRESETS.items():
        recipe = Recipe.from_preset(name)
        presets.append({"name": name, "description": description, "recipe": recipe.to_dict(),
                        "yaml": recipe.to_yaml()})
    return presets


@extend_schema(operation_id="presets_list", summary="The recipe presets, each as a recipe dict and as YAML",
               responses={200: PresetListSerializer, **ERRORS})
@api_view(["GET"])
def presets(request: Request) -> Response:
    return Response({"presets": _presets()})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _compare_row(job: Job, request: Request) -> dict[str, Any]:
    results = job.results if isinstance(job.results, dict) else {}
    evaluation = results.get("evaluation") if isinstance(results.get("evaluation"), dict) else {}
    metrics = evaluation.get("metrics") if isinstance(evaluation.get("metrics"), list) else []
    from compression.evaluation.recovery import headline

    head = headline([row for row in metrics if isinstance(row, dict)]) or {}
    recovery = _number(head.get("recovery_pct"))
    size = results.get("size") if isinstance(results.get("size"), dict) else None
    weight_bytes = _number((size or {}).get("compressed_weight_bytes"))
    speed = results.get("speed") if isinstance(results.get("speed"), dict) else None
    return {
        "id": job.id, "name": job.display_name, "recipe_name": job.recipe_name, "finished_at": job.finished_at,
        "recovery_pct": round(recovery, 3) if recovery is not None else None,
        "recovery_kind": head.get("kind"),
        "size_mb": round(weight_bytes / 1e6, 3) if weight_bytes is not None else None,
        "size": size, "speedup": _number((speed or {}).get("speedup")), "speed": speed,
        "metrics": metrics, "links": _links(job, request),
    }


@extend_schema(operation_id="compare", summary="Your succeeded jobs of one base model, with their numbers",
               description="Recovery (the mean over the accuracy tasks, or the perplexity recovery when no accuracy task "
                           "ran — `recovery_kind` says which; never a mix of both), size and speed of every job of "
                           "yours that succeeded on `model`, oldest first: the data of the compare charts.",
               parameters=[CompareFilterSerializer], responses={200: CompareSerializer, **ERRORS})
@api_view(["GET"])
def compare(request: Request) -> Response:
    model = _query(CompareFilterSerializer, request)["model"]
    jobs = _own_jobs(request).filter(model_source=model, status=Status.SUCCEEDED).order_by("finished_at", "id")
    rows = [_compare_row(job, request) for job in jobs[:500]]
    return Response(CompareSerializer({"model": model, "jobs": rows}).data)


@extend_schema(operation_id="recommend", summary="Which presets and group sizes a model allows, and the best "
                                                  "benchmarked recipe per bit budget",
               description="The model is checked exactly as on job submission (same `model` rules, same config "
                           "loading) and every preset (and group size) is run through the pre-flight against its "
                           "shapes. `budgets` ranks the side-by-side quality benchmark's recipes (bench/quality.py "
                           "on the demo model) per nominal bits per weight, marking those this model cannot take.",
               parameters=[RecommendFilterSerializer], responses={200: RecommendSerializer, **ERRORS})
@api_view(["GET"])
def recommend(request: Request) -> Response:
    model = _query(RecommendFilterSerializer, request)["model"]
    try:
        data = recommend_for_model(model)
    except SubmissionError as exc:
        return error_response(status.HTTP_400_BAD_REQUEST, (exc.field, exc.message))
    return Response(RecommendSerializer(data).data)


@extend_schema(exclude=True)
@api_view(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def not_found(request: Request, unmatched: str = "") -> Response:
    """Any other /api/ path: a JSON 404 rather than Django's HTML page."""
    raise exceptions.NotFound(f"no API endpoint at {request.path}; see /api/docs")
