"""OpenTelemetry SDK start-up: providers, readers, exporters and the sampler.

The core only holds API objects; this module decides what stands behind them,
from the settings and the standard ``OTEL_*`` variables (which the SDK's
exporters and samplers read themselves):

- metrics: a Prometheus scrape (served by the HTTP edge at ``/metrics``) unless
  ``telemetry.prometheus`` is false, plus OTLP push when an endpoint is set by
  ``telemetry.otlp_endpoint`` or ``OTEL_EXPORTER_OTLP[_METRICS]_ENDPOINT``.
  ``OTEL_METRICS_EXPORTER`` (``prometheus``, ``otlp``, ``console``, ``none``),
  when set, names the exporters instead.
- traces: only with ``telemetry.tracing``; OTLP unless ``OTEL_TRACES_EXPORTER``
  says otherwise; sampled by ``telemetry.trace_sample_ratio`` or
  ``OTEL_TRACES_SAMPLER``; a batch span is kept whenever a request it served is.
- ``OTEL_SDK_DISABLED=true`` turns both off; drift and feedback still work.

Every metric reader is bridged (``server.metric_bridge``): per-request
histograms aggregated outside the SDK are exported alongside the SDK's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
    _get_from_env_or_default,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry

from server import __version__
from server.config import Settings, TelemetrySettings
from server.core.monitoring.hub import SCOPE, Monitoring
from server.fleet_metrics import FleetMetrics
from server.metric_bridge import BridgedPeriodicReader, BridgedPrometheusReader, MetricBridge
from server.workers import FLEET_DIR_ENV

log = logging.getLogger("sluice.telemetry")


class TelemetryError(Exception):
    """The telemetry configuration cannot be honoured; the message says why."""


@dataclass(slots=True)
class Telemetry:
    """What start-up built; ``shutdown`` flushes exporters."""

    monitoring: Monitoring | None
    prometheus: CollectorRegistry | None = None
    meter_provider: MeterProvider | None = None
    tracer_provider: TracerProvider | None = None
    # Where per-request histograms go instead of the SDK; None when a reader
    # exports histograms as deltas (the bridge only keeps cumulative state).
    bridge: MetricBridge | None = None
    # Under `sluice serve --workers N`: the scrape that covers every worker.
    fleet: FleetMetrics | None = None

    def shutdown(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


@asynccontextmanager
async def open_telemetry(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> AsyncIterator[Telemetry]:
    """Build the providers; on exit push what is left (blocking I/O, so off the loop)."""
    telemetry = build_telemetry(settings, os.environ if environ is None else environ)
    try:
        yield telemetry
    finally:
        await asyncio.to_thread(telemetry.shutdown)


def build_telemetry(settings: Settings, environ: Mapping[str, str]) -> Telemetry:
    config = settings.telemetry
    wanted = config.enabled and environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
    if not wanted:
        if not (settings.drift.enabled or settings.feedback.enabled):
            return Telemetry(monitoring=None)
        return Telemetry(monitoring=Monitoring(settings))
    resource = service_resource(config)
    registry = CollectorRegistry() if "prometheus" in metric_exporters(config, environ) else None
    bridge = MetricBridge(resource, InstrumentationScope(SCOPE, __version__))
    readers = metric_readers(config, environ, registry, bridge)
    meter_provider = MeterProvider(
        metric_readers=readers, resource=resource, shutdown_on_exit=False
    )
    tracer_provider = tracer(config, environ, resource) if config.tracing else None
    usable = None if delta_histograms(config, environ) else bridge
    fleet = _fleet(registry, resource, environ)
    # With tracing, SDK histograms keep their exemplars (a batch run without
    # batching records inside the request's span).
    return Telemetry(
        monitoring=Monitoring(
            settings, meter_provider, tracer_provider, None if config.tracing else usable
        ),
        prometheus=fleet.registry if fleet is not None else registry,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        bridge=usable,
        fleet=fleet,
    )


def _fleet(
    registry: CollectorRegistry | None, resource: Resource, environ: Mapping[str, str]
) -> FleetMetrics | None:
    """The scrape over every worker, when this process is one of several (server/workers.py)."""
    fleet_dir = environ.get(FLEET_DIR_ENV)
    if registry is None or not fleet_dir:
        return None
    instance = str(resource.attributes.get("service.instance.id", os.getpid()))
    return FleetMetrics(registry, instance, Path(fleet_dir))


def service_resource(config: TelemetrySettings) -> Resource:
    """``service.name``/``service.version``; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win."""
    resource = Resource.create()
    defaults: dict[str, Any] = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        defaults[SERVICE_NAME] = config.service_name
    if SERVICE_VERSION not in resource.attributes:
        defaults[SERVICE_VERSION] = __version__
    return resource.merge(Resource(defaults)) if defaults else resource


def _listed(environ: Mapping[str, str], name: str) -> set[str] | None:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def _otlp_configured(config: TelemetrySettings, environ: Mapping[str, str], signal: str) -> bool:
    return bool(
        config.otlp_endpoint
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def metric_exporters(config: TelemetrySettings, environ: Mapping[str, str]) -> set[str]:
    listed = _listed(environ, "OTEL_METRICS_EXPORTER")
    if listed is not None:
        return listed - {"none"}
    chosen = {"prometheus"} if config.prometheus else set()
    if _otlp_configured(config, environ, "METRICS"):
        chosen.add("otlp")
    return chosen


def delta_histograms(config: TelemetrySettings, environ: Mapping[str, str]) -> bool:
    """Whether an exporter asks for delta histograms (OTLP's temporality preference)."""
    if "otlp" not in metric_exporters(config, environ):
        return False
    preference = environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "")
    return preference.strip().lower() in ("delta", "lowmemory")


def metric_readers(
    config: TelemetrySettings,
    environ: Mapping[str, str],
    registry: CollectorRegistry | None,
    bridge: MetricBridge,
) -> list[MetricReader]:
    readers: list[MetricReader] = []
    interval = None if config.export_interval_s is None else config.export_interval_s * 1000
    for name in sorted(metric_exporters(config, environ)):
        if name == "prometheus" and registry is not None:
            # A registry per app, not prometheus_client's global one: several apps
            # (tests, reloads) in one process must not collide.
            readers.append(
                BridgedPrometheusReader(bridge, registry=registry, scope_info_enabled=False)
            )
        elif name in ("otlp", "console"):
            exporter = _metric_exporter(config, environ) if name == "otlp" else None
            readers.append(
                BridgedPeriodicReader(
                    bridge, exporter or ConsoleMetricExporter(), export_interval_millis=interval
                )
            )
        else:
            raise TelemetryError(f"OTEL_METRICS_EXPORTER: unknown exporter '{name}'")
    return readers


def _protocol(config: TelemetrySettings, environ: Mapping[str, str], signal: str) -> str:
    protocol = (
        config.otlp_protocol
        or environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol not in ("http/protobuf", "grpc"):
        raise TelemetryError(f"OTLP protocol '{protocol}' is not supported (http/protobuf, grpc)")
    return protocol


def _endpoint(config: TelemetrySettings, protocol: str, path: str) -> str | None:
    """An explicit endpoint from the settings; None lets the exporter read OTEL_* itself."""
    if not config.otlp_endpoint:
        return None
    base = config.otlp_endpoint.rstrip("/")
    return base if protocol == "grpc" else f"{base}/{path}"


def _metric_exporter(config: TelemetrySettings, environ: Mapping[str, str]) -> MetricExporter:
    protocol = _protocol(config, environ, "METRICS")
    endpoint = _endpoint(config, protocol, "v1/metrics")
    if protocol == "grpc":
        module = _grpc("metric_exporter")
        return module.OTLPMetricExporter(endpoint=endpoint)  # type: ignore[no-any-return]
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=endpoint)


def _span_exporter(config: TelemetrySettings, environ: Mapping[str, str]) -> SpanExporter:
    protocol = _protocol(config, environ, "TRACES")
    endpoint = _endpoint(config, protocol, "v1/traces")
    if protocol == "grpc":
        module = _grpc("trace_exporter")
        return module.OTLPSpanExporter(endpoint=endpoint)  # type: ignore[no-any-return]
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


def _grpc(signal: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"opentelemetry.exporter.otlp.proto.grpc.{signal}")
    except ImportError as exc:
        raise TelemetryError(
            "OTLP over gRPC needs the opentelemetry-exporter-otlp-proto-grpc package "
            "(pip install 'sluice[otlp-grpc]'), or use http/protobuf"
        ) from exc


def tracer(
    config: TelemetrySettings, environ: Mapping[str, str], resource: Resource
) -> TracerProvider:
    if config.trace_sample_ratio is not None:
        base: Sampler = ParentBased(TraceIdRatioBased(config.trace_sample_ratio))
    else:
        base = _get_from_env_or_default()
    provider = TracerProvider(
        sampler=LinkAwareSampler(base), resource=resource, shutdown_on_exit=False
    )
    for name in sorted(_listed(environ, "OTEL_TRACES_EXPORTER") or {"otlp"}):
        if name == "none":
            continue
        if name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_span_exporter(config, environ)))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise TelemetryError(f"OTEL_TRACES_EXPORTER: unknown exporter '{name}'")
    return provider


class LinkAwareSampler(Sampler):
    """Samples a root span when any span it links to was sampled, else asks ``delegate``.

    A batch span has no parent, only links to the requests it served; without
    this, ratio sampling would keep a request's trace but drop its batch.
    """

    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        if (
            not parent.is_valid
            and links
            and any(link.context.trace_flags.sampled for link in links)
        ):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkAware{{{self._delegate.get_description()}}}"
