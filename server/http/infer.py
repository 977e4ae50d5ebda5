"""``POST /v2/models/{name}[/versions/{version}]/infer``: one endpoint, two ways in.

``InferEndpoint`` is a plain ASGI app. The Starlette router reaches it like
any route; ``HotRoutes``, the innermost layer of the chain, reaches it
straight from ASGI, with the path matched by one split instead of the
router's regex walk and no Request/Response objects (py-spy at 64 clients:
that machinery cost about as much CPU per request as decoding, validating and
predicting together). Both set the same ``path_params`` and ``route`` in the
scope, so every layer of the chain sees the same request either way, and the
answer is produced by the same code.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import time
import zlib
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.routing import Reason
from server.errors import DeadlineExceeded, InvalidInput, Overloaded, ServingError
from server.http.codec import HEADER_LENGTH, DecodedInfer, decode_infer, decompress
from server.http.errors import error_response, serving_error_response
from server.http.handle import PlaneHandle
from server.http.memo import CodecMemo
from server.http.overload import SHED

ROUTE = "/v2/models/{name}/infer"
VERSIONED_ROUTE = "/v2/models/{name}/versions/{version}/infer"
_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_COMPRESS_ABOVE = 4096
_HEADER_LENGTH = HEADER_LENGTH.encode()
# A deadline as a header: ours, and the one Envoy (Istio) sets for the upstream's budget.
TIMEOUT_HEADER = "x-request-timeout-ms"
ENVOY_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
_TIMEOUTS = (TIMEOUT_HEADER.encode(), ENVOY_TIMEOUT_HEADER.encode())
_WANTED = frozenset(
    {b"content-length", b"content-encoding", b"accept-encoding", _HEADER_LENGTH, *_TIMEOUTS}
)
_MAX_VERSION_DIGITS = 18  # fits an int64, as Triton's and perf_analyzer's parsers need


def parse_version(raw: str | None) -> int | None:
    """A ``{version}`` path segment as a number; None when there is none.

    Only the canonical form: ASCII digits without leading zeros. ``01`` and
    U+0661 ARABIC-INDIC DIGIT ONE (which Python's ``int`` reads as 1) would give one version several
    URLs, so that a gateway rule on ``/versions/1`` could be walked around.
    """
    if raw is None or raw == "":
        return None
    if (
        not (raw.isascii() and raw.isdigit())
        or (raw[0] == "0" and len(raw) > 1)
        or len(raw) > _MAX_VERSION_DIGITS
    ):
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        raise InvalidInput(
            f"version must be a whole number in ASCII digits without leading zeros, got '{shown}'"
        )
    return int(raw)


class InferEndpoint:
    """Decode, infer through the data plane, encode; errors become V2 error answers."""

    def __init__(
        self,
        handle: PlaneHandle,
        max_request_bytes: int,
        retry_after_s: int,
        decode_in_thread_bytes: int = 256 * 1024,
    ) -> None:
        self.handle = handle
        self.limit = max_request_bytes
        self.retry_after_s = retry_after_s
        self.in_thread = decode_in_thread_bytes
        self.memo = CodecMemo()
        # Bodies the memo sees: small ones, decoded on the loop anyway.
        self.memo_below = min(self.memo.max_body + 1, decode_in_thread_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One frame on purpose: this runs for every prediction.
        try:
            params = scope["path_params"]
            name = params["name"]
            version = parse_version(params.get("version"))
            plane = self.handle.get()
            # Unknown and unready models are refused before the body is read.
            key_header = plane.routing_key_header(name) if version is None else None
            key = None
            if key_header is not None:  # a canary is set: route by key, stickily
                key = next(
                    (v.decode("latin-1") for k, v in scope["headers"] if k == key_header), None
                )
            route = plane.route(name, version, key)
            headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}
            timeout = headers.get(_TIMEOUTS[0]) or headers.get(_TIMEOUTS[1])
            arrived = time.monotonic() if timeout is not None else 0.0
            body = await read_body(receive, headers.get(b"content-length"), self.limit)
            if isinstance(body, Response):
                await body(scope, receive, send)
                return
            encoding = headers.get(b"content-encoding")
            if not encoding and len(body) < self.memo_below:
                decoded = self.memo.decode(body, headers.get(_HEADER_LENGTH), name, version)
            elif len(body) < self.in_thread:
                decoded = _decode(
                    body, encoding, headers.get(_HEADER_LENGTH), name, version, self.limit
                )
            else:
                # Off the event loop, so other clients are served meanwhile (see _decode).
                decoded = await asyncio.to_thread(
                    _decode, body, encoding, headers.get(_HEADER_LENGTH), name, version, self.limit
                )
            if timeout is not None:
                _apply_deadline(decoded, timeout, arrived)
            result = await plane.infer(decoded.request, route)
        except ClientDisconnect:
            return  # nobody to answer
        except ServingError as exc:
            if isinstance(exc, Overloaded):
                scope[SHED] = True  # for the edge's limit: a refusal, not an answer
            await serving_error_response(exc, self.retry_after_s)(scope, receive, send)
            return
        payload, binary_header = self.memo.encode(result, decoded)
        if binary_header is None:
            raw = [(b"content-type", b"application/json")]
        else:
            raw = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(binary_header).encode()),
            ]
        payload = _compress(payload, headers.get(b"accept-encoding", ""), raw)
        raw.append((b"content-length", str(len(payload)).encode()))
        raw.append((b"x-model-version", str(result.version).encode()))
        if route.reason is Reason.FALLBACK:
            raw.append((b"x-model-fallback", b"true"))
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": payload})


def _decode(
    body: bytes,
    encoding: str | None,
    header_length: str | None,
    model: str,
    version: int | None,
    limit: int,
) -> DecodedInfer:
    """Decompress and decode; large bodies run this in a thread.

    orjson and numpy hold the GIL while they work, so a thread alone would
    not let the loop in; the codec converts long tensors in slices, and the
    loop gets its turn between them (the interpreter's switch interval).
    """
    return decode_infer(decompress(body, encoding, limit), header_length, model, version)


def _apply_deadline(decoded: DecodedInfer, timeout: str, arrived: float) -> None:
    """The header's deadline, counted from the request's arrival, as the ``timeout`` parameter.

    The tighter of the header and a ``timeout`` parameter in the body wins;
    a deadline already gone is a 504 before anything is computed.
    """
    try:
        budget_ms = float(timeout)
    except ValueError:
        budget_ms = math.nan
    if not math.isfinite(budget_ms) or budget_ms <= 0:
        raise InvalidInput(f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
    left_us = budget_ms * 1000 - (time.monotonic() - arrived) * 1e6
    if left_us <= 0:
        raise DeadlineExceeded(f"request deadline of {budget_ms:g} ms passed before compute")
    request = decoded.request
    parameters: dict[str, Any] = dict(request.parameters)
    given = parameters.get("timeout")
    if isinstance(given, int | float) and not isinstance(given, bool) and 0 < given < left_us:
        return  # the body's own deadline is tighter
    parameters["timeout"] = max(1, int(left_us))
    request.parameters = parameters


class HotRoutes:
    """The innermost layer: ``POST`` to the infer routes goes straight to the endpoint.

    Everything else goes on to the Starlette router. The scope gets the same
    ``path_params`` and ``route`` the router would set, so telemetry records
    the same route template.
    """

    def __init__(self, app: ASGIApp, endpoint: InferEndpoint, routes: tuple[Route, Route]) -> None:
        self.app = app
        self.endpoint = endpoint
        self.route, self.versioned = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
                parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
                if len(parts) == 1 and parts[0]:
                    scope["path_params"] = {"name": parts[0]}
                    scope["route"] = self.route
                    return await self.endpoint(scope, receive, send)
                if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
                    scope["path_params"] = {"name": parts[0], "version": parts[2]}
                    scope["route"] = self.versioned
                    return await self.endpoint(scope, receive, send)
        return await self.app(scope, receive, send)


def infer_routes(endpoint: InferEndpoint) -> tuple[Route, Route]:
    """The two Starlette routes of the endpoint (unversioned, versioned)."""
    return (
        Route(ROUTE, endpoint, methods=["POST"]),
        Route(VERSIONED_ROUTE, endpoint, methods=["POST"]),
    )


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes | Response:
    """The request body from ASGI ``receive``, or a 413 answer once it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read.
    Raises ``ClientDisconnect`` when the client goes away first.
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return error_response(413, f"request body of {declared} bytes exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return error_response(413, f"request body exceeds {limit} bytes")
        if not message.get("more_body", False):
            return chunk if not chunks else b"".join([*chunks, chunk])
        chunks.append(chunk)


def _compress(payload: bytes, accept: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    if len(payload) < _COMPRESS_ABOVE or not accept:
        return payload
    offered = {part.split(";")[0].strip() for part in accept.lower().split(",")}
    if "gzip" in offered:
        headers.append((b"content-encoding", b"gzip"))
        return gzip.compress(payload, compresslevel=1)
    if "deflate" in offered:
        headers.append((b"content-encoding", b"deflate"))
        return zlib.compress(payload, 1)
    return payload
