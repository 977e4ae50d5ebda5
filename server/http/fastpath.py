"""The two V2 infer routes served straight from ASGI, ahead of Starlette's stack.

Every other route goes through Starlette's middleware, router and
Request/Response objects. For the infer routes that stack cost about as much
CPU per request as decoding, validating and predicting together (py-spy at 64
clients: three middleware layers wrapping ``send`` twice each, the router's
regex walk, a Request and a Response per call). Here the path is matched by
one split, the body read from ``receive`` and the answer sent as two messages.

Behaviour is the same as the Starlette route: the same checks in the same
order, the same error bodies and statuses, the same
``http.server.request.duration`` series (route template, method, status,
``error.type``). With tracing on the request goes through Starlette so that the
middleware's span wraps it.
"""

from __future__ import annotations

import contextlib
import logging
import time

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.errors import ServingError
from server.http.codec import HEADER_LENGTH
from server.http.errors import error_response, serving_error_response
from server.http.routes import V2Api, read_body
from server.http.telemetry import EdgeTelemetry

log = logging.getLogger("sluice.http")

ROUTE = "/v2/models/{name}/infer"
VERSIONED_ROUTE = "/v2/models/{name}/versions/{version}/infer"
_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_WANTED = frozenset(
    {b"content-length", b"content-encoding", b"accept-encoding", HEADER_LENGTH.encode()}
)


def match_infer(path: str) -> tuple[str, str | None, str] | None:
    """``(name, version or None, route template)`` when ``path`` is an infer route."""
    if not path.startswith(_PREFIX) or not path.endswith(_SUFFIX):
        return None
    parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
    if len(parts) == 1:
        return (parts[0], None, ROUTE) if parts[0] else None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2], VERSIONED_ROUTE
    return None


class InferFastPath:
    """Answers ``POST`` to the infer routes; the app hands it those before Starlette."""

    def __init__(self, api: V2Api, edge: EdgeTelemetry, retry_after_s: int) -> None:
        self.api = api
        self.edge = edge
        self.retry_after_s = retry_after_s

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, target: tuple[str, str | None, str]
    ) -> None:
        edge = self.edge
        started = time.perf_counter()
        status, error = 500, None
        try:
            status = await self._serve(scope, receive, send, target[0], target[1])
        except ClientDisconnect:
            return  # nobody to answer, nothing served
        except Exception as exc:
            error = type(exc).__qualname__
            log.exception("unexpected error on POST %s", scope["path"])
            # If the answer had started, the server closes the connection instead.
            with contextlib.suppress(Exception):
                await error_response(500, f"internal error: {error}")(scope, receive, send)
        finally:
            if edge.active:
                if error is None and status >= 500:
                    error = str(status)
                key = ("POST", scope.get("scheme", "http"), target[2], status, error)
                edge.observe(key, time.perf_counter() - started)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None
    ) -> int:
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}
        api = self.api
        try:
            model_version = api.infer_target(name, version)
            limit = api.settings.max_request_bytes
            body = await read_body(receive, headers.get("content-length"), limit)
            if isinstance(body, Response):
                await body(scope, receive, send)
                return body.status_code
            payload, media, extra = await api.answer(
                name,
                model_version,
                body,
                headers.get("content-encoding"),
                headers.get(HEADER_LENGTH),
                headers.get("accept-encoding", ""),
            )
        except ServingError as exc:
            response = serving_error_response(exc, self.retry_after_s)
            await response(scope, receive, send)
            return response.status_code
        raw = [
            (b"content-type", media.encode()),
            (b"content-length", str(len(payload)).encode()),
            *((k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": payload})
        return 200
