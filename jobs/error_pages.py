"""Django's error handlers (compressor_ui.urls handler400/404/500): JSON of the API's one error
shape under /api/, Django's plain pages elsewhere; a body Django refused as too big is a 413."""
from __future__ import annotations

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.views import defaults

from .api_errors import INTERNAL_ERROR, error_response
from .middleware import body_limit, too_large


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """SuspiciousOperation raised while reading the request (too many fields, a body past Django's
    limit), wherever it surfaced: a middleware such as CSRF reading request.POST, or a view."""
    if isinstance(exception, RequestDataTooBig):
        return too_large(request, body_limit(request))
    if _is_api(request):
        return error_response(400, (None, f"bad request: {exception}" if str(exception) else "bad request"))
    return defaults.bad_request(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return error_response(404, (None, "no API endpoint at this path; see /api/docs"))
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return error_response(500, (None, INTERNAL_ERROR))
    return defaults.server_error(request)
