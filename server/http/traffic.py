"""``GET``/``PUT /v2/models/{name}/traffic`` and the manual rollout actions.

Thin as every endpoint: decode, call the data plane, encode. The document is
the contract described in ``server/core/traffic.py`` and the README.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.core.steering import TrafficView
from server.errors import InvalidInput
from server.http.handle import PlaneHandle
from server.http.routes import json_response, read_json

ACTIONS = ("promote", "rollback", "pause", "resume")


def render(view: TrafficView) -> dict[str, Any]:
    doc: dict[str, Any] = view.document.model_dump(mode="json")
    doc.update(
        state=view.state.value,
        step=view.step,
        reason=view.reason,
        paused=view.paused,
        last_analysis=asdict(view.last_analysis) if view.last_analysis else None,
        versions=[asdict(report) for report in view.versions],
        breakers={str(v): breaker for v, breaker in view.breakers.items()},
    )
    return doc


class TrafficApi:
    """The traffic routes over the data plane."""

    def __init__(self, handle: PlaneHandle, max_body_bytes: int) -> None:
        self.handle = handle
        self.limit = max_body_bytes

    async def get(self, request: Request) -> Response:
        return json_response(render(self.handle.get().traffic(request.path_params["name"])))

    async def put(self, request: Request) -> Response:
        plane = self.handle.get()
        name = request.path_params["name"]
        plane.model(name)  # unknown model: 404 before the body is read
        doc = await read_json(request, self.limit, "traffic document")
        actor = request.headers.get("x-actor", "api")
        view = await plane.set_traffic(name, doc, actor, request.headers.get("x-reason", ""))
        return json_response(render(view))

    async def act(self, request: Request) -> Response:
        plane = self.handle.get()
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in ACTIONS:
            raise InvalidInput(f"unknown traffic action '{action}' (one of {', '.join(ACTIONS)})")
        body = await read_json(request, self.limit, f"{action} request") or {}
        if not isinstance(body, dict):
            raise InvalidInput(f"{action} request body must be a JSON object")
        actor = str(body.get("actor") or request.headers.get("x-actor", "api"))
        view = await plane.steer(name, action, actor, str(body.get("reason") or ""))
        return json_response(render(view))

    def routes(self) -> list[BaseRoute]:
        base = "/v2/models/{name}/traffic"
        return [
            Route(base, self.get, methods=["GET"]),
            Route(base, self.put, methods=["PUT"]),
            Route(base + "/{action}", self.act, methods=["POST"]),
        ]
