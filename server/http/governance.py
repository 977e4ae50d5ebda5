"""Approvals over HTTP: ``POST /v2/models/{name}/versions/{version}/approve``
(admin: the auth layer asks admin scope of every model action it does not
know) and ``GET .../approval``.

Thin as every endpoint: decode, call the data plane, encode.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.core.governance import Approval
from server.errors import InvalidInput
from server.http.auth import KEY_SCOPE
from server.http.handle import PlaneHandle
from server.http.routes import json_response, path_version, read_json


def render(approval: Approval | None, name: str, version: int) -> dict[str, object]:
    if approval is None:
        return {"model": name, "version": version, "approved": False}
    return {"approved": True, **approval.to_dict()}


class GovernanceApi:
    """The approval routes over the data plane."""

    def __init__(self, handle: PlaneHandle, max_body_bytes: int) -> None:
        self.handle = handle
        self.limit = max_body_bytes

    async def approve(self, request: Request) -> Response:
        plane = self.handle.get()
        name = request.path_params["name"]
        version = path_version(request)
        assert version is not None  # the route has {version}
        plane.model(name, version)  # unknown model or version: 404 before the body is read
        doc = await read_json(request, self.limit, "approval")
        if not isinstance(doc, dict):
            raise InvalidInput('approval body must be {"actor": "...", "reason": "..."}')
        actor, reason = doc.get("actor"), doc.get("reason")
        unknown = set(doc) - {"actor", "reason"}
        if unknown:
            raise InvalidInput(f"approval: unknown keys {', '.join(sorted(unknown))}")
        if not isinstance(actor, str) or not isinstance(reason, str):
            raise InvalidInput("approval 'actor' and 'reason' must be strings")
        key = request.scope.get(KEY_SCOPE)
        approval = await plane.approve(
            name, version, actor, reason, key_id=getattr(key, "id", "") if key else ""
        )
        return json_response(render(approval, name, version))

    async def approval(self, request: Request) -> Response:
        name = request.path_params["name"]
        version = path_version(request)
        assert version is not None
        found = self.handle.get().approval(name, version)
        return json_response(render(found, name, version))

    def routes(self) -> list[BaseRoute]:
        versioned = "/v2/models/{name}/versions/{version}"
        return [
            Route(versioned + "/approve", self.approve, methods=["POST"]),
            Route(versioned + "/approval", self.approval),
        ]
