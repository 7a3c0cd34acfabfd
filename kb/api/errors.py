"""One error shape for the whole API: {"error": {"code", "message", "fields"?}}."""

from __future__ import annotations

from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, object]) -> Response | None:
    """DRF's handler, with validation errors kept as field messages under a stable shape."""
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        detail = response.data
        response.data = {
            "error": {
                "code": "invalid",
                "message": "Some parameters are invalid.",
                "fields": detail if isinstance(detail, dict) else {"non_field_errors": detail},
            }
        }
    else:
        detail = response.data.get("detail", "") if isinstance(response.data, dict) else ""
        code = getattr(exc, "default_code", "error")
        response.data = {"error": {"code": code, "message": str(detail) or str(exc)}}
    if response.status_code == status.HTTP_429_TOO_MANY_REQUESTS and "Retry-After" not in response:
        wait = getattr(exc, "wait", None)
        response["Retry-After"] = str(int(wait) if wait else 60)
    return response
