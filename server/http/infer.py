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

import gzip
import zlib

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.routing import Reason
from server.errors import InvalidInput, ServingError
from server.http.codec import HEADER_LENGTH, decode_infer, decompress, encode_infer
from server.http.errors import error_response, serving_error_response
from server.http.handle import PlaneHandle

ROUTE = "/v2/models/{name}/infer"
VERSIONED_ROUTE = "/v2/models/{name}/versions/{version}/infer"
_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_COMPRESS_ABOVE = 4096
_HEADER_LENGTH = HEADER_LENGTH.encode()
_WANTED = frozenset({b"content-length", b"content-encoding", b"accept-encoding", _HEADER_LENGTH})


def parse_version(raw: str | None) -> int | None:
    """A ``{version}`` path segment as a number; None when there is none."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise InvalidInput(f"version must be a positive integer, got '{raw}'")
    return int(raw)


class InferEndpoint:
    """Decode, infer through the data plane, encode; errors become V2 error answers."""

    def __init__(self, handle: PlaneHandle, max_request_bytes: int, retry_after_s: int) -> None:
        self.handle = handle
        self.limit = max_request_bytes
        self.retry_after_s = retry_after_s

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
            body = await read_body(receive, headers.get(b"content-length"), self.limit)
            if isinstance(body, Response):
                await body(scope, receive, send)
                return
            body = decompress(body, headers.get(b"content-encoding"), self.limit)
            decoded = decode_infer(body, headers.get(_HEADER_LENGTH), name, version)
            result = await plane.infer(decoded.request, route)
        except ClientDisconnect:
            return  # nobody to answer
        except ServingError as exc:
            await serving_error_response(exc, self.retry_after_s)(scope, receive, send)
            return
        payload, binary_header = encode_infer(result, decoded)
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
