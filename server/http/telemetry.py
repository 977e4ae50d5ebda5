"""HTTP server telemetry as pure ASGI middleware: ``http.server.request.duration`` and spans.

Follows the stable HTTP semantic conventions: seconds, the route template (never
the raw path), method (``_OTHER`` for unknown ones), status code, ``url.scheme``
and ``error.type`` on failures. Each distinct combination gets its attributes
and its histogram series once; after that a request costs two clock reads, a
dict lookup and a bisect (``server.core.monitoring.histogram``), not an SDK record. With
tracing on (exemplars) or delta export the SDK histogram records instead.
"""

from __future__ import annotations

import time
from contextvars import Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram, Meter
from opentelemetry.propagate import extract
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.status import Status, StatusCode
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.monitoring.histogram import HistogramSeries, LocalHistogram
from server.http.chain import ResponseRecorder
from server.metric_bridge import MetricBridge

# Seconds, suited to millisecond latencies: 0.5 ms up to 10 s.
HTTP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
_Key = tuple[str, str, str | None, int, str | None]


class _Headers(Getter[list[tuple[bytes, bytes]]]):
    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        found = [value.decode("latin-1") for name, value in carrier if name.lower() == wanted]
        return found or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_GETTER = _Headers()


class EdgeTelemetry:
    """The instruments the middleware records into; bound by the lifespan once built."""

    def __init__(self) -> None:
        self._duration: Histogram | None = None
        self._local: LocalHistogram | None = None
        self._tracer: Tracer | None = None
        self._attributes: dict[_Key, dict[str, Any]] = {}
        self._series: dict[_Key, HistogramSeries] = {}
        self.active = False  # anything to record

    def bind(
        self, meter: Meter | None, tracer: Tracer | None, bridge: MetricBridge | None = None
    ) -> None:
        """Record into ``bridge`` when given and there is no tracer, else into ``meter``."""
        self._tracer = tracer
        self.active = tracer is not None or meter is not None
        if meter is None:
            return
        name, unit, description = (
            "http.server.request.duration",
            "s",
            "Duration of HTTP server requests",
        )
        if bridge is not None and tracer is None:
            self._local = bridge.create_histogram(name, unit, description, HTTP_BUCKETS)
        else:
            self._duration = meter.create_histogram(
                name,
                unit=unit,
                description=description,
                explicit_bucket_boundaries_advisory=HTTP_BUCKETS,
            )

    def unbind(self) -> None:
        """Stop recording; what was recorded stays with the bridge for the last export."""
        self._duration = self._local = self._tracer = None
        self._series.clear()
        self.active = False

    def attributes(self, key: _Key) -> dict[str, Any]:
        cached = self._attributes.get(key)
        if cached is None:
            method, scheme, route, status, error = key
            cached = {"http.request.method": method, "url.scheme": scheme}
            if route is not None:
                cached["http.route"] = route
            if status:
                cached["http.response.status_code"] = status
            if error is not None:
                cached["error.type"] = error
            self._attributes[key] = cached
        return cached

    def observe(self, key: _Key, seconds: float) -> None:
        """One finished request: a dict lookup and a bisect once the series exists."""
        series = self._series.get(key)
        if series is None:
            local = self._local
            if local is None:
                if self._duration is not None:
                    self._duration.record(seconds, self.attributes(key))
                return
            series = self._series[key] = local.series(self.attributes(key))
        series.observe(seconds)


class TelemetryMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and re-task requests)."""

    def __init__(self, app: ASGIApp, edge: EdgeTelemetry) -> None:
        self.app = app
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        edge = self.edge
        if scope["type"] != "http" or not edge.active:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        recorder = ResponseRecorder.of(send)  # the ErrorGuard's, outside this layer
        method = scope["method"]
        if method not in KNOWN_METHODS:
            method = "_OTHER"
        tracer = edge._tracer
        span = token = None
        if tracer is not None:
            span, token = _start_span(tracer, scope, method)
        error: str | None = None
        try:
            await self.app(scope, receive, recorder)
        except Exception as exc:
            error = type(exc).__qualname__
            raise
        finally:
            elapsed = time.perf_counter() - started
            status = recorder.status
            route = getattr(scope.get("route"), "path", None)
            if error is None and (status == 0 or status >= 500):
                error = str(status or 500)
            key = (method, scope.get("scheme", "http"), route, status or 500, error)
            edge.observe(key, elapsed)
            if span is not None:
                _end_span(span, token, method, route, edge.attributes(key), error)


def _start_span(tracer: Tracer, scope: Scope, method: str) -> tuple[Span, Token[Context]]:
    parent = extract(scope.get("headers") or [], getter=_GETTER)
    span = tracer.start_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return span, token


def _end_span(
    span: Span,
    token: Token[Context] | None,
    method: str,
    route: str | None,
    attributes: dict[str, Any],
    error: str | None,
) -> None:
    if token is not None:
        otel_context.detach(token)
    if route is not None:
        span.update_name(f"{method} {route}")
    span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
