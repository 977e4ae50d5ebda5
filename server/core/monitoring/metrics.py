"""OpenTelemetry instruments for serving, drift and quality (API only; the SDK is set up at start).

A histogram record costs the SDK 6-12 us (it cleans and hashes the attributes
every time), as much as a twentieth of a whole 1-row request. So nothing here
is recorded per request: what ``VersionStats`` already keeps on the hot path
(successes, failures by reason, rows, executions, queue/compute/request time,
cache lookups) is exported by observable instruments read at collection time,
and only per-execution histograms (compute time, batch size) are recorded as
batches run, into local histograms (``histogram.py``) when the edge provides
them, else into the SDK. Per-request latency is the HTTP edge's ``http.server.request.duration``.
Names follow the OpenTelemetry style and map to Prometheus as
``ml_inference_request_success_total`` and so on, close to Triton's
``nv_inference_request_success``; the ``*.time`` counters are Triton's
cumulative ``*_duration_us`` in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

from server.core.breaker import STATE_CODES
from server.core.cache import CachedDispatcher
from server.core.dispatch import BatchRecord
from server.core.monitoring.drift import STATUS_CODES, Status
from server.core.monitoring.histogram import HistogramFactory, HistogramSeries, LocalHistogram
from server.core.registry import ModelRegistry, ModelVersion
from server.core.store import SharedStore

# Seconds, from 100 us (an in-process XGBoost call) up to 10 s.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

Attributes = dict[str, str]


class ServingMetrics:
    """Per model version: requests, failures by reason, rows, latency, batches, queue, cache."""

    def __init__(self, meter: Meter, histograms: HistogramFactory | None = None) -> None:
        self._registry: ModelRegistry | None = None
        self._store: SharedStore | None = None
        self._attributes: dict[tuple[str, int], Attributes] = {}
        compute = ("ml.inference.compute.duration", "s", "Model execution time of one batch")
        batch = ("ml.inference.batch.size", "{row}", "Rows per model execution")
        self._series: dict[tuple[str, int], tuple[HistogramSeries, HistogramSeries]] = {}
        self._local: tuple[LocalHistogram, LocalHistogram] | None = None
        self._sdk: tuple[Histogram, Histogram] | None = None
        if histograms is not None:
            self._local = (
                histograms.create_histogram(*compute, DURATION_BUCKETS),
                histograms.create_histogram(*batch, BATCH_BUCKETS),
            )
        else:

            def sdk(spec: tuple[str, str, str], buckets: Sequence[float]) -> Histogram:
                name, unit, text = spec
                return meter.create_histogram(
                    name, unit=unit, description=text, explicit_bucket_boundaries_advisory=buckets
                )

            self._sdk = (sdk(compute, DURATION_BUCKETS), sdk(batch, BATCH_BUCKETS))
        counters: list[tuple[str, str, str, Callable[[CallbackOptions], Iterable[Observation]]]] = [
            ("ml.inference.request.success", "{request}", "Requests answered", self._successes),
            (
                "ml.inference.request.failure",
                "{request}",
                "Requests failed, by reason (the error class: Overloaded, InvalidInput, ...)",
                self._failed,
            ),
            (
                "ml.inference.request.rejected",
                "{request}",
                "Requests refused with 503 because a queue was full",
                self._rejected,
            ),
            (
                "ml.inference.fallbacks",
                "{request}",
                "Requests this version answered for another that could not (x-model-fallback)",
                self._fallbacks,
            ),
            (
                "ml.breaker.trips",
                "{trip}",
                "Times the version's circuit breaker opened",
                self._trips,
            ),
            ("ml.inference.count", "{row}", "Rows inferred", self._rows),
            ("ml.inference.exec.count", "{batch}", "Model executions", self._executions),
            ("ml.cache.lookups", "{row}", "Result cache lookups by result (rows)", self._cache),
            ("ml.cache.evictions", "{row}", "Rows evicted from the result cache", self._evictions),
            (
                "ml.cache.lookup.time",
                "s",
                "Cumulative time spent looking rows up in the result cache",
                self._lookup_time,
            ),
            (
                "ml.store.errors",
                "{call}",
                "Failed or timed-out calls to the shared store (Redis)",
                self._store_errors,
            ),
            (
                "ml.inference.request.time",
                "s",
                "Cumulative time of answered requests, in the core (Triton: request_duration)",
                self._request_time,
            ),
            (
                "ml.inference.queue.time",
                "s",
                "Cumulative time requests waited for their batch (Triton: queue_duration)",
                self._queue_time,
            ),
            (
                "ml.inference.compute.time",
                "s",
                "Cumulative model execution time (Triton: compute_infer_duration)",
                self._compute_time,
            ),
        ]
        for name, unit, description, callback in counters:
            meter.create_observable_counter(
                name, callbacks=[callback], unit=unit, description=description
            )
        gauges: list[tuple[str, str, str, Callable[[CallbackOptions], Iterable[Observation]]]] = [
            (
                "ml.breaker.state",
                "1",
                "Circuit breaker per version: 0 closed, 1 half-open, 2 open",
                self._breaker_state,
            ),
            ("ml.cache.size", "By", "Bytes held by the result cache", self._cache_bytes),
            ("ml.cache.entries", "{row}", "Rows held by the result cache", self._cache_entries),
            (
                "ml.store.available",
                "1",
                "1 while the shared store (Redis) answers, 0 during an outage",
                self._store_available,
            ),
        ]
        for name, unit, description, callback in gauges:
            meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "ml.inference.queue.depth",
            callbacks=[self._depth],
            unit="{request}",
            description="Requests waiting for a batch (Triton: pending request count)",
        )

    def attach(self, registry: ModelRegistry, store: SharedStore | None = None) -> None:
        self._registry = registry
        self._store = store

    def attributes(self, name: str, version: int) -> Attributes:
        key = (name, version)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = self._attributes[key] = {"model": name, "version": str(version)}
        return attributes

    # -- recorded as batches run ----------------------------------------------------

    def executed(self, version: ModelVersion, record: BatchRecord) -> None:
        if not record.ok:
            return
        key = (version.name, version.version)
        if self._sdk is not None:
            attributes = self.attributes(*key)
            self._sdk[0].record(record.compute_ns / 1e9, attributes)
            self._sdk[1].record(record.rows, attributes)
            return
        series = self._series.get(key)
        if series is None:
            assert self._local is not None
            attributes = self.attributes(*key)
            compute, batch = self._local
            series = self._series[key] = (compute.series(attributes), batch.series(attributes))
        series[0].observe(record.compute_ns / 1e9)
        series[1].observe(record.rows)

    # -- read at collection time --------------------------------------------------

    def _versions(self) -> Iterator[tuple[ModelVersion, Attributes]]:
        if self._registry is None:
            return
        # list() copies are atomic under the GIL; collection runs on the scrape thread.
        for entry in list(self._registry.models.values()):
            for mv in list(entry.versions.values()):
                yield mv, self.attributes(mv.name, mv.version)

    def _successes(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(mv.stats.success.count, a) for mv, a in self._versions()]

    def _failed(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {**a, "reason": reason})
            for mv, a in self._versions()
            for reason, count in list(mv.stats.failures_by_reason.items())
        ]

    def _rejected(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(mv.stats.failures_by_reason.get("Overloaded", 0), a)
            for mv, a in self._versions()
        ]

    def _fallbacks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(mv.stats.fallback_count, a) for mv, a in self._versions()]

    def _trips(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(mv.breaker.trips, a) for mv, a in self._versions() if mv.breaker is not None
        ]

    def _breaker_state(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(STATE_CODES[mv.breaker.state], a)
            for mv, a in self._versions()
            if mv.breaker is not None
        ]

    def _rows(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(mv.stats.inference_count, a) for mv, a in self._versions()]

    def _executions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(mv.stats.execution_count, a) for mv, a in self._versions()]

    def _cache(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for mv, a in self._versions():
            out.append(Observation(mv.stats.cache_hit.count, {**a, "result": "hit"}))
            out.append(Observation(mv.stats.cache_miss.count, {**a, "result": "miss"}))
        return out

    def _caches(self) -> Iterator[tuple[CachedDispatcher, Attributes]]:
        for mv, a in self._versions():
            if mv.cache is not None:
                yield mv.cache, a

    def _evictions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(c.counters.evictions, a) for c, a in self._caches()]

    def _lookup_time(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(c.counters.lookup_ns / 1e9, a) for c, a in self._caches()]

    def _cache_bytes(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(c.rows.bytes, a) for c, a in self._caches()]

    def _cache_entries(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(len(c.rows), a) for c, a in self._caches()]

    def _store_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._store is None else [Observation(self._store.stats.errors)]

    def _store_available(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._store is None:
            return []
        return [Observation(1 if self._store.stats.available else 0)]

    def _request_time(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation((mv.stats.success.ns + mv.stats.fail.ns) / 1e9, a)
            for mv, a in self._versions()
        ]

    def _queue_time(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(mv.stats.queue.ns / 1e9, a) for mv, a in self._versions()]

    def _compute_time(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(mv.stats.compute_infer.ns / 1e9, a) for mv, a in self._versions()]

    def _depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(mv.dispatcher.depth, a)
            for mv, a in self._versions()
            if mv.dispatcher is not None
        ]


# -- drift, data quality and model quality ----------------------------------------


class ObservationSource(Protocol):
    def observations(self, instrument: str) -> list[Observation]: ...


GAUGES: dict[str, tuple[str, str]] = {
    "ml.drift.status": ("", "Data drift per version: 0 ok, 1 warn, 2 alert, -1 no verdict"),
    "ml.drift.feature.status": ("", "Drift per feature: 0 ok, 1 warn, 2 alert, -1 no verdict"),
    "ml.drift.detected": ("", "1 when the feature's drift is at alert level"),
    "ml.drift.score": ("", "Drift statistic per feature (method psi, or js: JS distance base 2)"),
    "ml.drift.p_value": ("", "Chi-squared homogeneity p-value per feature"),
    "ml.drift.dataset_share": ("", "Share of features at alert level"),
    "ml.drift.window.rows": ("{row}", "Rows in the live drift window"),
    "ml.drift.profile_info": ("", "1, labelled with the reference profile's sha256"),
    "ml.prediction.drift.status": ("", "Prediction drift: 0 ok, 1 warn, 2 alert, -1 no verdict"),
    "ml.prediction.drift.detected": ("", "1 when the output's drift is at alert level"),
    "ml.prediction.drift.score": ("", "Drift statistic per output (method psi or js)"),
    "ml.feature.missing_ratio": ("", "Share of window rows with the feature missing (NaN)"),
    "ml.feature.nonfinite_ratio": ("", "Share of window rows with the feature infinite"),
    "ml.feature.out_of_range_ratio": ("", "Share of values outside the reference min/max"),
    "ml.performance": ("", "Live quality from feedback labels, by metric"),
    "ml.performance.reference": ("", "Holdout quality from the model card, by metric"),
    "ml.performance.delta": ("", "Live minus holdout quality, by metric"),
    "ml.concept_drift.status": ("", "Concept drift: 0 ok, 2 alert, -1 no verdict"),
    "ml.feedback.window.labels": ("{label}", "Labels in the live quality window"),
}
COUNTERS: dict[str, tuple[str, str]] = {
    "ml.drift.rows": ("{row}", "Rows observed by drift monitoring"),
    "ml.feedback.labels": ("{label}", "Feedback labels received, by result (matched|unmatched)"),
    "ml.monitoring.dropped": ("{request}", "Observations dropped because the queue was full"),
}


def register_monitoring(meter: Meter, source: ObservationSource) -> None:
    """Observable gauges and counters that read what the monitoring worker last published."""

    def reader(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda options: source.observations(name)

    for name, (unit, description) in GAUGES.items():
        meter.create_observable_gauge(
            name, callbacks=[reader(name)], unit=unit, description=description
        )
    for name, (unit, description) in COUNTERS.items():
        meter.create_observable_counter(
            name, callbacks=[reader(name)], unit=unit, description=description
        )


def report_observations(
    attributes: Attributes, report: Mapping[str, Any]
) -> dict[str, list[Observation]]:
    """A version's report (``MonitoringWorker._report``) as observations per instrument."""
    out: dict[str, list[Observation]] = {name: [] for name in GAUGES}

    def put(name: str, value: float | None, **extra: str) -> None:
        if value is not None:
            out[name].append(Observation(value, {**attributes, **extra}))

    data, prediction = report["data_drift"], report["prediction_drift"]
    if "columns" in data:
        put("ml.drift.status", STATUS_CODES[Status(data["status"])])
        put("ml.drift.dataset_share", data["share"])
        put("ml.drift.window.rows", report["window"]["rows"])
        put("ml.drift.profile_info", 1, profile_sha256=report["profile_sha256"])
        for feature, c in data["columns"].items():
            status = Status(c["status"])
            put("ml.drift.feature.status", STATUS_CODES[status], feature=feature)
            put("ml.drift.detected", int(status is Status.ALERT), feature=feature)
            put("ml.drift.score", c["psi"], feature=feature, method="psi")
            put("ml.drift.score", c["js"], feature=feature, method="js")
            put("ml.drift.p_value", c["p_value"], feature=feature, test="chi2")
            put("ml.feature.missing_ratio", c["missing_ratio"], feature=feature)
            put("ml.feature.nonfinite_ratio", c["nonfinite_ratio"], feature=feature)
            put("ml.feature.out_of_range_ratio", c["out_of_range_ratio"], feature=feature)
    if prediction.get("columns"):
        put("ml.prediction.drift.status", STATUS_CODES[Status(prediction["status"])])
    for output, c in prediction.get("columns", {}).items():
        status = Status(c["status"])
        put("ml.prediction.drift.detected", int(status is Status.ALERT), output=output)
        put("ml.prediction.drift.score", c["psi"], output=output, method="psi")
        put("ml.prediction.drift.score", c["js"], output=output, method="js")
    concept = report.get("concept_drift")
    if concept is not None:
        put("ml.concept_drift.status", STATUS_CODES[Status(concept["status"])])
        put("ml.feedback.window.labels", concept["labels"])
        for metric, m in concept["metrics"].items():
            put("ml.performance", m["live"], metric=metric)
            put("ml.performance.reference", m["reference"], metric=metric)
            put("ml.performance.delta", m["delta"], metric=metric)
    return out
