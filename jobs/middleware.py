"""Request-level guards: a body over the size limit is a 413 before it is read (or, sent without a
length, as soon as it has been counted past the limit), and every response carries a
Content-Security-Policy."""
from __future__ import annotations

import base64
import functools
import hashlib
import re
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.handlers.wsgi import LimitedStream
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
    """Answer 413 to a request whose body is over `body_limit`, before any parser reads it.

    Django's own DATA_UPLOAD_MAX_MEMORY_SIZE applies only where `request.body`/`request.POST` are read
    (DRF's JSON parser reads the stream directly), and surfaces as a 400. A declared Content-Length
    over the limit is refused at once. A chunked body (Transfer-Encoding: chunked, no length), which
    Django's WSGI request would read as empty, is read here, counted while it streams in and
    spooled (to disk past SPOOL_MEMORY bytes): past the limit it is a 413 without reading further,
    otherwise the request gets the spooled body and its length, so every parser sees it as if it had
    been declared. Multipart files past COMPRESSOR_MAX_UPLOAD_BYTES are still dropped while they
    stream in (jobs.uploads.LimitedUploadHandler)."""

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
        if (length or "chunked" not in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()
                or "wsgi.input" not in getattr(request, "environ", {})):
            return self.get_response(request)
        spool = read_chunked_body(request, limit)
        if spool is None:
            return too_large(request, limit)
        with spool:
            return self.get_response(request)


CHUNK = 64 * 1024
SPOOL_MEMORY = 1024 * 1024


def read_chunked_body(request: HttpRequest, limit: int):
    """The body of a request sent without a length, read from the WSGI input up to `limit` bytes
    and handed to the request as its stream (with CONTENT_LENGTH set to what arrived); None, after
    reading at most `limit` + CHUNK bytes, when the body is longer than `limit`."""
    stream = request.environ["wsgi.input"]
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
    received = 0
    while chunk := stream.read(CHUNK):
        received += len(chunk)
        if received > limit:
            spool.close()
            return None
        spool.write(chunk)
    spool.seek(0)
    request.META["CONTENT_LENGTH"] = str(received)
    request._stream = LimitedStream(spool, received)
    return spool


# Every page's scripts and styles are files served from here (static/js, static/css, plotly.js from
# the installed package, Swagger UI from drf-spectacular-sidecar): no inline <script>, no on*=
# handlers, no style attributes or <style> elements in our markup. Scripts may still set
# element.style and insert CSS rules (CSSOM), which CSP does not govern; plotly styles its SVG that way.
# Chart data travels in json_script islands (type application/json: data, not script).
# plotly.js does add <style> elements: empty ones it then fills through CSSOM, and one holding the
# CSS of its map module; those two contents are allowed by hash (computed from the very file we serve).
POLICY = [
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' {plotly_styles}",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
]


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.lru_cache(maxsize=1)
def plotly_style_hashes() -> tuple[str, ...]:
    """Hash sources for the <style> contents plotly.min.js inserts: the empty string, and every
    `.textContent='<css>'` literal of the bundle (its map CSS)."""
    import plotly

    bundle = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    literals = re.findall(r"\.textContent='([^'\\]*)'", bundle.read_text(encoding="utf-8"))
    return tuple(dict.fromkeys([_sha256(""), *(_sha256(css) for css in literals)]))


@functools.lru_cache(maxsize=1)
def content_security_policy() -> str:
    return "; ".join(POLICY).format(plotly_styles=" ".join(plotly_style_hashes()))


class ContentSecurityPolicyMiddleware:
    """Adds `content_security_policy()` to every response that has none."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", content_security_policy())
        return response
