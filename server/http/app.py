"""The HTTP application: the Starlette router, the ASGI chain around it, and the
lifespan, which is the composition root."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from server import __version__
from server.config import Settings
from server.core.stack import open_dataplane
from server.errors import ServingError
from server.http.access import AccessLayers
from server.http.chain import Layer, build_chain
from server.http.errors import error_response, internal_error_response, serving_error_response
from server.http.governance import GovernanceApi
from server.http.handle import PlaneHandle
from server.http.infer import HotRoutes, InferEndpoint
from server.http.monitoring import MonitoringApi
from server.http.openapi import openapi_route
from server.http.routes import V2Api
from server.http.telemetry import EdgeTelemetry, TelemetryMiddleware
from server.http.traffic import TrafficApi
from server.telemetry import open_telemetry

log = logging.getLogger("sluice.http")


def create_app(settings: Settings, access: Sequence[Layer] = ()) -> ASGIApp:
    """An ASGI app serving ``settings.model_repository``; models load in the lifespan.

    ``access`` are extra layers between telemetry and the routes, outermost
    first, inside the ones the settings ask for (``AccessLayers``); they see
    every request, infer included.
    """
    configured = AccessLayers(settings)
    handle = PlaneHandle()
    endpoint = InferEndpoint(
        handle,
        settings.max_request_bytes,
        settings.retry_after_s,
        settings.limits.decode_in_thread_bytes,
    )
    api = V2Api(handle, endpoint, settings.max_request_bytes)
    monitoring_api = MonitoringApi(handle, settings.max_request_bytes)
    traffic_api = TrafficApi(handle, settings.max_request_bytes)
    governance_api = GovernanceApi(handle, settings.max_request_bytes)
    edge = EdgeTelemetry()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_telemetry(settings) as telemetry,
            open_dataplane(settings, monitoring=telemetry.monitoring, governed=True) as plane,
        ):
            handle.plane = plane
            monitoring_api.telemetry = telemetry
            monitoring = telemetry.monitoring
            if monitoring is not None:
                edge.bind(monitoring.meter, monitoring.tracer, telemetry.bridge)
                configured.bind(monitoring.meter)
            # The loaded libraries and models are hundreds of thousands of long-lived
            # objects; a full collection walking them stalls every request for tens of
            # milliseconds (p99 75 ms -> 11 ms under load when frozen out of the GC).
            gc.collect()
            gc.freeze()
            log.info("serving %d model(s) from %s", len(plane.models()), settings.model_repository)
            try:
                yield
            finally:
                handle.plane = None
                edge.unbind()
                await configured.close()

    async def on_serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return serving_error_response(exc, settings.retry_after_s)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error_response(
                405, f"method {request.method} not allowed on {request.url.path}", exc.headers
            )
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette answers with this and re-raises; the chain's ErrorGuard logs it once.
        return internal_error_response(exc)

    table = [
        *api.routes(),
        *monitoring_api.routes(),
        *traffic_api.routes(),
        *governance_api.routes(),
    ]
    router = Starlette(
        routes=[*table, openapi_route(table, __version__)],
        lifespan=lifespan,
        exception_handlers={
            ServingError: on_serving_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    return build_chain(
        router,
        telemetry=partial(TelemetryMiddleware, edge=edge) if settings.telemetry.enabled else None,
        access=[*configured.layers, *access],
        hot=partial(HotRoutes, endpoint=endpoint, routes=api.infer_routes)
        if settings.http_fast_path
        else None,
    )
