"""Monitoring endpoints: ``GET /metrics``, drift reports and feedback labels.

Thin as every endpoint: decode, call the data plane, encode.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.core.monitoring.feedback import parse_labels
from server.errors import Unsupported
from server.http.handle import PlaneHandle
from server.http.routes import json_response, path_version, read_json
from server.telemetry import Telemetry


class MonitoringApi:
    """The monitoring routes; ``telemetry`` is what the lifespan opened."""

    def __init__(self, handle: PlaneHandle, max_body_bytes: int) -> None:
        self.handle = handle
        self.max_body_bytes = max_body_bytes
        self.telemetry: Telemetry | None = None

    async def metrics(self, request: Request) -> Response:
        registry = self.telemetry.prometheus if self.telemetry else None
        if registry is None:
            raise Unsupported("the Prometheus endpoint is disabled (telemetry.prometheus)")
        # Collection runs every observable callback: keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def drift(self, request: Request) -> Response:
        plane = self.handle.get()
        report = await plane.drift(request.path_params["name"], path_version(request))
        return json_response(report)

    async def feedback(self, request: Request) -> Response:
        plane = self.handle.get()
        name = request.path_params["name"]
        version = path_version(request)
        plane.model(name, version)  # unknown model or version: 404 before the body is read
        doc = await read_json(request, self.max_body_bytes, "feedback")
        outcome = await plane.feedback(name, version, parse_labels(doc))
        return json_response(outcome.to_dict(name, version))

    def routes(self) -> list[BaseRoute]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        table: list[BaseRoute] = [Route("/metrics", self.metrics)]
        for base in (model, versioned):
            table += [
                Route(base + "/drift", self.drift),
                Route(base + "/feedback", self.feedback, methods=["POST"]),
            ]
        return table
