"""The one place ServingError becomes an HTTP status."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

from server.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RuntimeFailure,
    ServingError,
    Unsupported,
)

STATUS: dict[type[ServingError], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    ModelNotReady: 503,
    Overloaded: 503,
    DeadlineExceeded: 504,
    RuntimeFailure: 500,
    Unsupported: 501,
}


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """A ``{"error": ...}`` JSON body, the shape every V2 client reads."""
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def serving_error_response(exc: ServingError, retry_after_s: int) -> Response:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    headers = None
    if isinstance(exc, Overloaded | ModelNotReady):
        headers = {"Retry-After": str(max(retry_after_s, round(exc.retry_after_s)))}
    return error_response(status, exc.message, headers)


def internal_error_response(exc: BaseException) -> Response:
    """A 500 that names the exception's type and nothing else (no traceback, no message)."""
    return error_response(500, f"internal error: {type(exc).__name__}")
