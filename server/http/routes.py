"""Open Inference Protocol endpoints: decode, call the service, encode."""

from __future__ import annotations

import gzip
import itertools
import os
import zlib

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive

from server import __version__
from server.config import Settings
from server.core.registry import ModelEntry, ModelVersion, VersionState
from server.core.service import InferenceService
from server.errors import InvalidInput, ModelNotFound, ModelNotReady, ServingError, Unsupported
from server.http import presenters
from server.http.codec import HEADER_LENGTH, decode_infer, decompress, encode_infer
from server.http.errors import error_response

_JSON = "application/json"
_COMPRESS_ABOVE = 4096


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=_JSON)


class RequestIds:
    """Ids for requests that came without one: a random per-process prefix and a counter.

    Unique across restarts and replicas (64 random bits per process) and ten times
    cheaper than ``uuid4`` on the hot path.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


def path_version(request: Request) -> int | None:
    """The ``{version}`` path parameter as a number; None when the route has none."""
    return parse_version(request.path_params.get("version"))


def parse_version(raw: str | None) -> int | None:
    """A ``{version}`` path segment as a number; None when there is none."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise InvalidInput(f"version must be a positive integer, got '{raw}'")
    return int(raw)


class V2Api:
    """Holds the service the lifespan builds; every endpoint is a bound method."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service: InferenceService | None = None
        self._ids = RequestIds()

    @property
    def _service(self) -> InferenceService:
        if self.service is None:
            raise ModelNotReady("server is starting; models are not loaded yet")
        return self.service

    # -- server ---------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return _json(
            {"name": "sluice", "version": __version__, "extensions": presenters.EXTENSIONS}
        )

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        service = self.service
        ready = service is not None and service.registry.is_ready(
            strict=self.settings.strict_readiness
        )
        return _json({"ready": ready}, 200 if ready else 503)

    # -- models ---------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        entry = self._service.registry.models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return entry

    def _chosen(self, entry: ModelEntry, version: int | None) -> ModelVersion | None:
        if version is not None:
            mv = entry.versions.get(version)
            if mv is None:
                raise ModelNotFound(
                    f"Request for unknown model: '{entry.name}' version {version} is not found"
                )
            return mv
        ready = entry.ready_versions()
        if ready:
            return ready[-1]
        return max(entry.versions.values(), key=lambda v: v.version, default=None)

    async def list_models(self, request: Request) -> Response:
        models = self._service.registry.models
        return _json({"models": [presenters.model_metadata(e, None) for e in models.values()]})

    async def model_metadata(self, request: Request) -> Response:
        entry = self._entry(request.path_params["name"])
        version = path_version(request)
        mv = self._chosen(entry, version)
        return _json(presenters.model_metadata(entry, mv, versioned=version is not None))

    async def model_ready(self, request: Request) -> Response:
        entry = self._entry(request.path_params["name"])
        mv = self._chosen(entry, path_version(request))
        ready = mv is not None and mv.state is VersionState.READY
        body = {"name": entry.name, "ready": ready}
        if not ready:
            body["reason"] = mv.reason if mv is not None else entry.error or "no versions"
        return _json(body, 200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        entry = self._entry(request.path_params["name"])
        return _json(presenters.model_config(entry, self._chosen(entry, path_version(request))))

    async def model_stats(self, request: Request) -> Response:
        registry = self._service.registry
        name = request.path_params.get("name")
        version = path_version(request)
        entries = [self._entry(name)] if name else list(registry.models.values())
        stats = []
        for entry in entries:
            for mv in entry.versions.values():
                if version is None or mv.version == version:
                    stats.append(mv.stats.to_dict(entry.name, mv.version))
        if name and version is not None and not stats:
            raise ModelNotFound(
                f"Request for unknown model: '{name}' version {version} is not found"
            )
        return _json({"model_stats": stats})

    async def infer(self, request: Request) -> Response:
        """The Starlette route; ``server.http.fastpath`` serves the same answers without it."""
        name = request.path_params["name"]
        version = self.infer_target(name, request.path_params.get("version"))
        headers = request.headers
        limit = self.settings.max_request_bytes
        body = await read_body(request.receive, headers.get("content-length"), limit)
        if isinstance(body, Response):
            return body
        payload, media, extra = await self.answer(
            name,
            version,
            body,
            headers.get("content-encoding"),
            headers.get(HEADER_LENGTH),
            headers.get("accept-encoding", ""),
        )
        return Response(payload, media_type=media, headers=extra)

    def infer_target(self, name: str, raw_version: str | None) -> int | None:
        """The requested version; unknown models fail here, before the body is read."""
        version = parse_version(raw_version)
        self._service.registry.resolve(name, version)
        return version

    async def answer(
        self,
        name: str,
        version: int | None,
        body: bytes,
        content_encoding: str | None,
        header_length: str | None,
        accept_encoding: str,
    ) -> tuple[bytes, str, dict[str, str]]:
        """Decode, infer, encode: the response body, its media type and extra headers."""
        body = decompress(body, content_encoding, self.settings.max_request_bytes)
        decoded = decode_infer(body, header_length, name, version)
        if decoded.request.id is None:
            # Always answer with an id (as MLServer does) so feedback can name the request.
            decoded.request.id = self._ids.next()
        result = await self._service.infer(decoded.request)
        payload, binary_header = encode_infer(result, decoded)
        extra = {}
        media = _JSON
        if binary_header is not None:
            extra["Inference-Header-Content-Length"] = str(binary_header)
            media = "application/octet-stream"
        return _compress(payload, accept_encoding, extra), media, extra

    # -- repository -----------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        registry = self._service.registry
        rows = presenters.repository_index(registry.models, registry.repository.names())
        options = await _optional_json(request)
        if options.get("ready") is True:
            rows = [r for r in rows if r["state"] == VersionState.READY.value]
        return _json(rows)

    async def repository_load(self, request: Request) -> Response:
        self._check_control()
        name = request.path_params["name"]
        options = await _optional_json(request)
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("load request 'parameters' must be an object")
        if any(key.startswith("file:") or key == "config" for key in parameters):
            raise Unsupported("uploading model files or configs at load time is not supported")
        entry = await self._service.registry.load(name)
        if not entry.ready_versions():
            reason = entry.error or "; ".join(
                f"version {v.version}: {v.reason}" for v in entry.versions.values()
            )
            raise InvalidInput(f"failed to load '{name}': {reason}")
        return _json({"name": name, "load": True})

    async def repository_unload(self, request: Request) -> Response:
        self._check_control()
        name = request.path_params["name"]
        await _optional_json(request)
        await self._service.registry.unload(name)
        return _json({"name": name, "unload": True})

    def _check_control(self) -> None:
        if not self.settings.repository_control:
            raise Unsupported("repository load/unload is disabled (repository_control: false)")

    def routes(self) -> list[BaseRoute]:
        """The route table; ``/v2/models/stats`` precedes ``/v2/models/{name}``."""
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        # Routes match in order: the hot inference routes come first.
        table: list[BaseRoute] = [
            Route(model + "/infer", self.infer, methods=["POST"]),
            Route(versioned + "/infer", self.infer, methods=["POST"]),
            Route("/v2", self.server_metadata),
            Route("/v2/", self.server_metadata),
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/v2/models", self.list_models),
            Route("/v2/models/stats", self.model_stats),
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
            Route("/v2/repository/models/{name}/load", self.repository_load, methods=["POST"]),
            Route("/v2/repository/models/{name}/unload", self.repository_unload, methods=["POST"]),
        ]
        for base in (model, versioned):
            table += [
                Route(base, self.model_metadata),
                Route(base + "/ready", self.model_ready),
                Route(base + "/config", self.model_config),
                Route(base + "/stats", self.model_stats),
            ]
        return table


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


async def _optional_json(request: Request) -> dict[str, object]:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


def _compress(payload: bytes, accept: str, headers: dict[str, str]) -> bytes:
    if len(payload) < _COMPRESS_ABOVE or not accept:
        return payload
    offered = {part.split(";")[0].strip() for part in accept.lower().split(",")}
    if "gzip" in offered:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(payload, compresslevel=1)
    if "deflate" in offered:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(payload, 1)
    return payload


__all__ = ["ServingError", "V2Api"]
