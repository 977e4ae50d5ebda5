"""Histograms aggregated outside the SDK: exported exactly as an SDK histogram would be."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from asgi_support import lifespan
from monitoring_support import MODEL, build_credit, infer_body, sample
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.config import DriftSettings, Settings, TelemetrySettings
from server.http.app import create_app
from server.http.telemetry import EdgeTelemetry
from server.metric_bridge import BridgedPeriodicReader, BridgedPrometheusReader, MetricBridge
from server.telemetry import delta_histograms

Samples = dict[str, list[tuple[dict[str, str], float]]]
BOUNDS = (0.1, 0.5, 1.0)
VALUES = (0.05, 0.1, 0.3, 0.5, 0.7, 2.0, 0.1)  # two exactly on a bound


def scrape(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def family(samples: Samples, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(suffix, sorted labels): value}`` of one histogram family."""
    return {
        (name[len(prefix) :], tuple(sorted(labels.items()))): value
        for name, found in samples.items()
        if name.startswith(prefix)
        for labels, value in found
    }


def some_sdk_metric(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(1)]


def test_a_bridged_histogram_scrapes_exactly_as_the_sdk_histogram() -> None:
    registry = CollectorRegistry()
    bridge = MetricBridge(Resource.create(), InstrumentationScope("sluice"))
    reader = BridgedPrometheusReader(bridge, registry=registry, scope_info_enabled=False)
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("sluice")
    meter.create_observable_counter("requests", callbacks=[some_sdk_metric])
    sdk = meter.create_histogram(
        "sdk.duration", unit="s", description="d", explicit_bucket_boundaries_advisory=BOUNDS
    )
    local = bridge.create_histogram("local.duration", "s", "d", BOUNDS)
    attributes = {"http.route": "/a", "http.response.status_code": 200}
    series = local.series(attributes)
    for value in VALUES:
        sdk.record(value, attributes)
        series.observe(value)

    sizes = meter.create_histogram(
        "sdk.size", unit="{row}", explicit_bucket_boundaries_advisory=(1, 2, 4)
    )
    local_sizes = bridge.create_histogram("local.size", "{row}", "", (1, 2, 4)).series({"m": "x"})
    for rows in (1, 3, 3, 8):
        sizes.record(rows, {"m": "x"})
        local_sizes.observe(rows)

    first = scrape(registry)
    got = family(first, "local_duration_seconds")
    assert got == family(first, "sdk_duration_seconds")
    assert family(first, "local_size") == family(first, "sdk_size")  # integer bounds: le="4"
    assert ("_bucket", (("le", "4"), ("m", "x"))) in family(first, "local_size")
    labels = (("http_response_status_code", "200"), ("http_route", "/a"))
    assert got[("_bucket", (*labels, ("le", "0.1")))] == 3  # 0.05 and twice 0.1
    assert got[("_count", labels)] == len(VALUES)
    assert got[("_sum", labels)] == pytest.approx(sum(VALUES))

    series.observe(0.2)
    sdk.record(0.2, attributes)
    second = scrape(registry)
    assert family(second, "local_duration_seconds") == family(second, "sdk_duration_seconds")
    assert family(second, "local_duration_seconds")[("_count", labels)] == len(VALUES) + 1
    provider.shutdown()


class Captured(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        pass


def test_a_pushed_export_carries_the_bridged_histogram_in_its_scope() -> None:
    exporter = Captured()
    resource = Resource.create({"service.name": "pushed"})
    bridge = MetricBridge(resource, InstrumentationScope("sluice", "1.0"))
    reader = BridgedPeriodicReader(bridge, exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    provider.get_meter("sluice", "1.0").create_observable_counter(
        "requests", callbacks=[some_sdk_metric]
    )
    series = bridge.create_histogram("local.duration", "s", "d", BOUNDS).series({"k": "v"})
    for value in VALUES:
        series.observe(value)
    provider.force_flush()
    (resource_metrics,) = exporter.exports[-1].resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "pushed"
    (scope,) = resource_metrics.scope_metrics
    assert scope.scope.name == "sluice"
    metrics = {m.name: m for m in scope.metrics}
    assert set(metrics) == {"requests", "local.duration"}
    histogram = metrics["local.duration"]
    assert histogram.unit == "s"
    assert histogram.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    (point,) = histogram.data.data_points
    assert dict(point.attributes) == {"k": "v"}
    assert tuple(point.bucket_counts) == (3, 2, 1, 1)
    assert point.count == len(VALUES)
    assert (point.min, point.max) == (0.05, 2.0)
    provider.shutdown()


def test_requests_recorded_before_shutdown_reach_the_last_export() -> None:
    exporter = Captured()
    resource = Resource.create()
    bridge = MetricBridge(resource, InstrumentationScope("sluice"))
    reader = BridgedPeriodicReader(bridge, exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    provider.get_meter("sluice").create_observable_counter("requests", callbacks=[some_sdk_metric])
    edge = EdgeTelemetry()
    edge.bind(provider.get_meter("sluice"), None, bridge)
    key = ("POST", "http", "/v2/models/{name}/infer", 200, None)
    for _ in range(3):
        edge.observe(key, 0.002)
    edge.unbind()  # the lifespan unbinds before the providers shut down
    edge.observe(key, 0.002)  # a straggler after unbind is not recorded
    provider.shutdown()  # the final push
    metrics = {
        m.name: m
        for rm in exporter.exports[-1].resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    (point,) = metrics["http.server.request.duration"].data.data_points
    assert point.count == 3
    assert point.attributes["http.response.status_code"] == 200


def test_delta_temporality_keeps_the_sdk_histogram() -> None:
    otlp = TelemetrySettings(otlp_endpoint="http://collector:4318")
    preference = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
    assert delta_histograms(otlp, {preference: "DELTA"})
    assert delta_histograms(otlp, {preference: "lowmemory"})
    assert not delta_histograms(otlp, {preference: "cumulative"})
    assert not delta_histograms(TelemetrySettings(), {preference: "delta"})  # Prometheus only


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_credit(tmp_path_factory.mktemp("credit"))


async def test_concurrent_requests_are_each_counted_once(credit_repo: Path) -> None:
    requests = 300
    settings = Settings(model_repository=credit_repo, drift=DriftSettings(interval_s=0))
    app = create_app(settings)
    sizes = [1 + i % 3 for i in range(requests)]
    bodies = [infer_body(sample(rows, seed=i)) for i, rows in enumerate(sizes)]
    transport = httpx.ASGITransport(app=app)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://sluice") as client,
    ):
        answers = await asyncio.gather(
            *(client.post(f"/v2/models/{MODEL}/infer", json=body) for body in bodies)
        )
        assert [a.status_code for a in answers] == [200] * requests
        metrics = await client.get("/metrics")
        drift = (await client.get(f"/v2/models/{MODEL}/drift")).json()

    samples: Samples = {}
    for found in text_string_to_metric_families(metrics.text):
        for s in found.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))

    def one(name: str, **labels: str) -> float:
        values = [v for got, v in samples[name] if labels.items() <= got.items()]
        assert len(values) == 1, (name, labels, samples[name])
        return values[0]

    infer = {"http_route": "/v2/models/{name}/infer", "http_response_status_code": "200"}
    duration = "http_server_request_duration_seconds"
    assert one(f"{duration}_count", **infer) == requests
    assert one(f"{duration}_bucket", **infer, le="+Inf") == requests
    buckets = sorted(
        (float(labels["le"]), v)
        for labels, v in samples[f"{duration}_bucket"]
        if infer.items() <= labels.items()
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert one(f"{duration}_sum", **infer) > 0
    version = {"model": MODEL, "version": "1"}
    assert one("ml_inference_request_success_total", **version) == requests
    assert one("ml_inference_count_total", **version) == sum(sizes)
    assert drift["window"]["rows_total"] == sum(sizes)
