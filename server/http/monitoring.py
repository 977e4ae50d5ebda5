"""Monitoring endpoints: ``GET /metrics``, drift reports and feedback labels.

Thin as every endpoint: decode, call the monitoring worker, encode.
"""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.core.monitoring.feedback import parse_labels
from server.core.monitoring.worker import MonitoringWorker
from server.core.registry import ModelVersion
from server.core.service import InferenceService
from server.errors import InvalidInput, ModelNotFound, ModelNotReady, Unsupported
from server.http.routes import path_version
from server.telemetry import Telemetry


def _json(doc: object, status: int = 200) -> Response:
    return Response(
        orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
    )


class MonitoringApi:
    """Holds what the lifespan builds: the service and the telemetry it was given."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.service: InferenceService | None = None
        self.telemetry: Telemetry | None = None

    def _worker(self, what: str) -> MonitoringWorker:
        monitoring = self.telemetry.monitoring if self.telemetry else None
        if monitoring is None or monitoring.worker is None:
            raise Unsupported(f"{what} is disabled on this server (settings drift / feedback)")
        return monitoring.worker

    def _resolve(self, request: Request) -> ModelVersion:
        if self.service is None:
            raise ModelNotReady("server is starting; models are not loaded yet")
        return self.service.registry.resolve(request.path_params["name"], path_version(request))

    async def metrics(self, request: Request) -> Response:
        registry = self.telemetry.prometheus if self.telemetry else None
        if registry is None:
            raise Unsupported("the Prometheus endpoint is disabled (telemetry.prometheus)")
        # Collection runs every observable callback: keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def drift(self, request: Request) -> Response:
        worker = self._worker("drift monitoring")
        mv = self._resolve(request)
        return _json(await worker.report(mv))

    async def feedback(self, request: Request) -> Response:
        worker = self._worker("feedback")
        if self.service is None:
            raise ModelNotReady("server is starting; models are not loaded yet")
        name = request.path_params["name"]
        version = path_version(request)
        entry = self.service.registry.models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if version is not None and version not in entry.versions:
            raise ModelNotFound(
                f"Request for unknown model: '{name}' version {version} is not found"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise InvalidInput(f"feedback body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"feedback is not valid JSON: {exc}") from exc
        outcome = await worker.feedback(name, version, parse_labels(doc))
        return _json(outcome.to_dict(name, version))

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
