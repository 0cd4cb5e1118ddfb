"""Request-level guards that run before any view: a body over the size limit is a 413 before it is
read, and every response carries the security headers (jobs/security_headers is added by the CSP
work)."""
from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from .api_errors import error_response


def body_limit(request: HttpRequest) -> int:
    """The largest body accepted: multipart bodies may carry one calibration file plus the form's
    fields; everything else (JSON, url-encoded forms) is held to DATA_UPLOAD_MAX_MEMORY_SIZE."""
    fields = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if request.content_type == "multipart/form-data":
        return settings.COMPRESSOR_MAX_UPLOAD_BYTES + fields
    return fields


def too_large(request: HttpRequest, limit: int) -> HttpResponse:
    message = f"the request body is larger than the limit of {limit} bytes"
    if request.path.startswith("/api/"):
        return error_response(413, (None, message))
    return HttpResponse(f"413 Payload Too Large: {message}\n", status=413, content_type="text/plain; charset=utf-8")


class RequestSizeLimitMiddleware:
    """Answer 413 to a request whose Content-Length is over `body_limit`, before any parser reads it.

    Django's own DATA_UPLOAD_MAX_MEMORY_SIZE applies only where `request.body`/`request.POST` are read
    (DRF's JSON parser reads the stream directly), and surfaces as a 400; a body without a length
    (chunked) is read as empty by Django's WSGI request, so the declared length is the one to check.
    Multipart files past COMPRESSOR_MAX_UPLOAD_BYTES are still dropped while they stream in
    (jobs.uploads.LimitedUploadHandler)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = body_limit(request)
        if length > limit:
            return too_large(request, limit)
        return self.get_response(request)
