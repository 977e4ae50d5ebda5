"""Open Inference Protocol endpoints other than infer: decode, call the data plane, encode."""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.core.dataplane import DataPlane
from server.errors import InvalidInput, Unsupported
from server.http import presenters
from server.http.handle import PlaneHandle
from server.http.infer import InferEndpoint, infer_routes, parse_version, read_body

_JSON = "application/json"
MAX_NAME_BYTES = 255  # a model name is a folder name in the repository


def repository_name(name: str) -> str:
    """A model name that can only mean a folder directly inside the repository.

    Checked before load or unload touch the disk: an absurd name is the
    client's mistake (400), not a file system error (500).
    """
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidInput(f"model name is {size} bytes long; at most {MAX_NAME_BYTES}")
    if name in (".", "..") or any(c in name for c in "/\\\0") or not name.isprintable():
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise InvalidInput(f"model name {shown!r} is not a folder name in the repository")
    return name


def json_response(doc: object, status: int = 200) -> Response:
    return Response(
        orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type=_JSON,
    )


def path_version(request: Request) -> int | None:
    """The ``{version}`` path parameter as a number; None when the route has none."""
    return parse_version(request.path_params.get("version"))


async def read_json(request: Request, limit: int, what: str) -> object:
    """A JSON body of at most ``limit`` bytes; ``None`` when the body is empty."""
    body = await read_body(request.receive, request.headers.get("content-length"), limit)
    if isinstance(body, Response):
        raise HTTPException(413, f"{what} body exceeds {limit} bytes")
    if not body.strip():
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc


class V2Api:
    """The V2 routes; each is a bound method over the data plane."""

    def __init__(self, handle: PlaneHandle, infer: InferEndpoint, max_request_bytes: int) -> None:
        self.handle = handle
        self.infer_routes = infer_routes(infer)
        self.limit = max_request_bytes

    @property
    def _plane(self) -> DataPlane:
        return self.handle.get()

    # -- server ---------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return json_response(
            {
                "name": DataPlane.name,
                "version": DataPlane.version,
                "extensions": presenters.EXTENSIONS,
            }
        )

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        plane = self.handle.plane
        ready = plane is not None and plane.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    # -- models ---------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        models = self._plane.models()
        return json_response({"models": [presenters.model_metadata(m) for m in models]})

    async def model_metadata(self, request: Request) -> Response:
        version = path_version(request)
        info = self._plane.model(request.path_params["name"], version)
        return json_response(presenters.model_metadata(info, versioned=version is not None))

    async def model_ready(self, request: Request) -> Response:
        readiness = self._plane.readiness(request.path_params["name"], path_version(request))
        body: dict[str, object] = {"name": readiness.model, "ready": readiness.ready}
        if not readiness.ready:
            body["reason"] = readiness.reason
        return json_response(body, 200 if readiness.ready else 503)

    async def model_config(self, request: Request) -> Response:
        info = self._plane.model(request.path_params["name"], path_version(request))
        return json_response(presenters.model_config(info))

    async def model_stats(self, request: Request) -> Response:
        found = self._plane.statistics(request.path_params.get("name"), path_version(request))
        return json_response({"model_stats": [presenters.statistics(s) for s in found]})

    # -- repository -----------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        options = await self._options(request, "repository index request")
        rows = self._plane.index(ready_only=options.get("ready") is True)
        return json_response(presenters.repository_index(rows))

    async def repository_load(self, request: Request) -> Response:
        name = repository_name(request.path_params["name"])
        options = await self._options(request, "load request")
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("load request 'parameters' must be an object")
        if any(key.startswith("file:") or key == "config" for key in parameters):
            raise Unsupported("uploading model files or configs at load time is not supported")
        await self._plane.load(name)
        return json_response({"name": name, "load": True})

    async def repository_unload(self, request: Request) -> Response:
        name = repository_name(request.path_params["name"])
        await self._options(request, "unload request")
        await self._plane.unload(name)
        return json_response({"name": name, "unload": True})

    async def _options(self, request: Request, what: str) -> dict[str, object]:
        doc = await read_json(request, self.limit, what)
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise InvalidInput(f"{what} body must be a JSON object")
        return doc

    def routes(self) -> list[BaseRoute]:
        """The route table; ``/v2/models/stats`` precedes ``/v2/models/{name}``."""
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        # Routes match in order: the hot inference routes come first.
        table: list[BaseRoute] = [
            *self.infer_routes,
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
