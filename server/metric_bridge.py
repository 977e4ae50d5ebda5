"""Local histograms (``server.core.monitoring.histogram``) handed to the SDK's readers.

The readers built at start-up (``BridgedPrometheusReader``,
``BridgedPeriodicReader``) add the bridge's histograms to what the SDK
collected, as cumulative ``Histogram`` points in the bridge's instrumentation
scope, so Prometheus and OTLP see standard OpenTelemetry histograms: the same
name, unit, description, attributes and buckets as an SDK instrument. A
collection sees every observation made before it, with no flush delay: the
series are the state.

What the bridge does not do, and callers keep the SDK instruments for:
exemplars (all histograms, when tracing is on) and delta temporality (OTLP
with ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` delta or lowmemory:
a delta point's min and max cannot be derived from cumulative state). The
bridge's points ride along with the SDK's own collection, which is never empty
while a model is loaded (the per-version counters report even zeros).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from server.core.monitoring.histogram import LocalHistogram


def _metric(histogram: LocalHistogram, now_ns: int) -> Metric | None:
    points = [
        HistogramDataPoint(
            attributes=s.attributes,
            start_time_unix_nano=s.start_ns,
            time_unix_nano=now_ns,
            count=sum(s.counts),
            sum=s.sum,
            bucket_counts=s.counts,
            explicit_bounds=histogram.boundaries,
            min=s.min,
            max=s.max,
        )
        for s in histogram.snapshot()
    ]
    if not points:
        return None
    data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
    return Metric(
        name=histogram.name, description=histogram.description, unit=histogram.unit, data=data
    )


class MetricBridge:
    """The local histograms of one meter provider, in one instrumentation scope."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        self.resource = resource
        self.scope = scope
        self._histograms: list[LocalHistogram] = []

    def create_histogram(
        self, name: str, unit: str, description: str, boundaries: Sequence[float]
    ) -> LocalHistogram:
        histogram = LocalHistogram(name, unit, description, boundaries)
        self._histograms.append(histogram)
        return histogram

    def merge(self, data: MetricsData) -> MetricsData:
        """``data`` with the bridge's metrics added to its scope (created when absent)."""
        now = time.time_ns()
        metrics = [m for h in list(self._histograms) if (m := _metric(h, now)) is not None]
        if not metrics:
            return data
        resources = list(data.resource_metrics) or [
            ResourceMetrics(self.resource, [], self.resource.schema_url)
        ]
        first = resources[0]
        scopes = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == self.scope.name:
                scopes[i] = ScopeMetrics(scope.scope, [*scope.metrics, *metrics], scope.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self.scope, metrics, self.scope.schema_url or ""))
        resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resource_metrics=resources)


class BridgedPrometheusReader(PrometheusMetricReader):
    """The Prometheus reader, with the bridge's histograms in every scrape."""

    def __init__(self, bridge: MetricBridge, **kwargs: Any) -> None:
        self._bridge = bridge  # before the base registers its collector
        super().__init__(**kwargs)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if metrics_data is not None:
            metrics_data = self._bridge.merge(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


class BridgedPeriodicReader(PeriodicExportingMetricReader):
    """A periodic exporting reader (OTLP, console), with the bridge's histograms in every export."""

    def __init__(self, bridge: MetricBridge, *args: Any, **kwargs: Any) -> None:
        self._bridge = bridge  # before the base starts its export thread
        super().__init__(*args, **kwargs)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if metrics_data is not None:
            metrics_data = self._bridge.merge(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)
