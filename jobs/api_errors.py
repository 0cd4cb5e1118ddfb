"""Every REST API error is JSON of one shape, whatever went wrong and whatever the client accepts:

    {"errors": [{"field": "recipe.group_size", "message": "..."}]}

`field` is a dotted path into the request (`calibration.samples`, `evaluation.tasks[1]`, `status`
for a query parameter) or null when the error is not about one field (bad JSON, not found,
not authenticated). Unexpected exceptions become a generic JSON 500 and their traceback goes to
the log, never to the client.
"""
from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, JsonResponse
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal server error; the details are in the server log"


def error_body(*errors: tuple[str | None, str]) -> dict[str, list[dict[str, Any]]]:
    return {"errors": [{"field": field, "message": message} for field, message in errors]}


def error_response(status: int, *errors: tuple[str | None, str], headers: dict | None = None) -> JsonResponse:
    return JsonResponse(error_body(*errors), status=status, headers=headers)


def flatten_detail(detail: Any, path: str = "") -> list[tuple[str | None, str]]:
    """DRF's nested error detail -> [(dotted path or None, message)], in the order given."""
    if isinstance(detail, dict):
        errors: list[tuple[str | None, str]] = []
        for key, value in detail.items():
            if key in ("non_field_errors", "detail"):
                errors += flatten_detail(value, path)
            elif isinstance(key, int):  # ListField/DictField items are keyed by their index
                errors += flatten_detail(value, f"{path}[{key}]")
            else:
                errors += flatten_detail(value, f"{path}.{key}" if path else str(key))
        return errors
    if isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            return [(path or None, str(item)) for item in detail]
        errors = []
        for i, item in enumerate(detail):
            if item:  # DRF puts {} at the indexes of list items that were fine
                errors += flatten_detail(item, f"{path}[{i}]")
        return errors
    return [(path or None, str(detail))]


def json_exception_handler(exc: Exception, context: dict) -> JsonResponse:
    """DRF's EXCEPTION_HANDLER: a JsonResponse (not a DRF Response), so no renderer can turn it into
    anything but JSON."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) if str(exc) else None)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):  # multipart fields past DATA_UPLOAD_MAX_MEMORY_SIZE
        return error_response(413, (None, "the request body is larger than the limit"))
    elif isinstance(exc, SuspiciousOperation):  # too many fields or files, malformed multipart
        exc = exceptions.ParseError(f"bad request: {exc}")
    if not isinstance(exc, exceptions.APIException):
        view = context.get("view")
        log.exception("unexpected error in API view %s", getattr(view, "__name__", type(view).__name__),
                      exc_info=exc)
        return error_response(500, (None, INTERNAL_ERROR))
    headers = {}
    if auth := getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = auth
    if wait := getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(wait))
    return error_response(exc.status_code, *flatten_detail(exc.detail), headers=headers)


class JSONFallbackNegotiation(DefaultContentNegotiation):
    """Answer in the view's first renderer (JSON) instead of 406 when the Accept header names
    nothing we speak: a script sending `Accept: text/html` still gets a useful answer."""

    def select_renderer(self, request, renderers, format_suffix=None):
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except exceptions.NotAcceptable:
            return renderers[0], renderers[0].media_type


MAX_JSON_DEPTH = 32


def json_depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists/dicts more than ``limit`` levels deep (iterative: no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return False


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, but a body nested too deeply is a 400: the decoder's own RecursionError
    (thousands of levels) and, below that, anything deeper than MAX_JSON_DEPTH, which every
    recursive step after parsing (validation, error rendering, storing) would otherwise face."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError(f"JSON parse error - nested more than {MAX_JSON_DEPTH} levels deep") from None
        if json_depth_exceeds(data, MAX_JSON_DEPTH):
            raise exceptions.ParseError(f"JSON parse error - nested more than {MAX_JSON_DEPTH} levels deep")
        return data
