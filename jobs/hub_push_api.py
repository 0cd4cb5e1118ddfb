"""POST /api/jobs/<id>/push: the REST side of jobs.hub_push (the job page's button uses the same function)."""
from __future__ import annotations

from uuid import UUID

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from drf_spectacular.types import OpenApiTypes
from rest_framework import exceptions, serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from .api_errors import error_response
from .hub_push import PushError, push_job
from .models import Job
from .serializers import ErrorSerializer


class PushRequestSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=200, help_text="The Hub model repo to create, e.g. your-name/model")
    private = serializers.BooleanField(default=True, help_text="Create the repo private (default) or public")
    token = serializers.CharField(max_length=400, required=False, allow_blank=True, write_only=True,
                                  help_text="A Hugging Face access token with write access; omit it to use "
                                            "the one you stored. Never logged or shown again.")
    remember_token = serializers.BooleanField(default=False,
                                              help_text="Store the given token (encrypted) for later pushes")


PUSH_RESULT = inline_serializer("PushResult", fields={
    "url": serializers.URLField(), "commit_url": serializers.URLField(), "repo_id": serializers.CharField(),
    "private": serializers.BooleanField(), "files": serializers.IntegerField(), "bytes": serializers.IntegerField(),
})


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


@extend_schema(
    operation_id="jobs_push", summary="Push the checkpoint and model card to the Hugging Face Hub",
    description="Creates the repo `repo_id` (never overwrites an existing one) and uploads every file of the "
                "job's artifact in one commit. Errors name the field: `token` (missing, malformed, rejected, "
                "read-only), `repo_id` (syntax, exists, namespace the token cannot write), `job` (not succeeded, "
                "artifact gone), `hub` (unreachable or refusing). A failed push leaves no repo behind.",
    parameters=[OpenApiParameter("job_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The job's id")],
    request=PushRequestSerializer,
    responses={200: PUSH_RESULT, 400: _error("Invalid input; each error names its field"),
               401: _error("No or bad credentials"), 403: _error("Forbidden (e.g. no CSRF token)"),
               404: _error("No such job among yours"), 409: _error("The job did not succeed or has no artifact"),
               502: _error("The Hub could not be reached or refused the push"),
               503: _error("The Hub is switched off on this server")})
@api_view(["POST"])
def job_push(request: Request, job_id: UUID) -> Response:
    job = Job.objects.filter(owner=request.user, pk=job_id).first()
    if job is None:
        raise exceptions.NotFound("no job with this id")
    body = PushRequestSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    data = body.validated_data
    try:
        result = push_job(job, repo_id=data["repo_id"], private=data["private"], token=data.get("token") or None,
                          remember_token=data["remember_token"], owner=request.user)
    except PushError as exc:
        return error_response(exc.status, (exc.field, exc.message))
    return Response({"url": result.url, "commit_url": result.commit_url, "repo_id": data["repo_id"].strip(),
                     "private": result.private, "files": result.files, "bytes": result.bytes})
