"""Explicit-bucket histograms aggregated in plain Python, for per-request and per-batch values.

An OpenTelemetry SDK ``Histogram.record`` costs 6-12 us: it builds a
``Measurement``, cleans and hashes the attributes and takes a lock, every call.
A ``LocalHistogram`` does the same aggregation (buckets, sum, count, min, max
per attribute set) in a few list operations: the caller looks its series up
once per attribute set, then ``observe`` is a bisect and four updates under an
uncontended lock. Nothing here knows the SDK: the edge's ``MetricBridge`` hands
``snapshot`` to the SDK's readers at collection time, as standard OpenTelemetry
histogram points.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

AttributeValue = str | bool | int | float


class HistogramSeries:
    """One attribute set's buckets, sum, min and max."""

    __slots__ = ("_boundaries", "_lock", "attributes", "counts", "max", "min", "start_ns", "sum")

    def __init__(
        self,
        attributes: Mapping[str, AttributeValue],
        boundaries: tuple[float, ...],
        lock: threading.Lock,
    ) -> None:
        self.attributes = dict(attributes)
        self.counts = [0] * (len(boundaries) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.start_ns = time.time_ns()
        self._boundaries = boundaries
        self._lock = lock

    def observe(self, value: float) -> None:
        """Count ``value`` (a bucket holds values up to and including its bound, as the SDK)."""
        lock = self._lock  # a collection on another thread reads all fields at once
        lock.acquire()  # (a with block costs a third more)
        try:
            self.counts[bisect_left(self._boundaries, value)] += 1
            self.sum += value
            if value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
        finally:
            lock.release()


@dataclass(frozen=True, slots=True)
class SeriesSnapshot:
    """A series' cumulative state at one instant."""

    attributes: dict[str, AttributeValue]
    start_ns: int
    counts: tuple[int, ...]
    sum: float
    min: float
    max: float


class LocalHistogram:
    """An explicit-bucket histogram instrument whose series live here, not in the SDK."""

    def __init__(self, name: str, unit: str, description: str, boundaries: Sequence[float]) -> None:
        if any(b >= c for b, c in pairwise(boundaries)):
            raise ValueError(f"{name}: bucket boundaries must increase")
        self.name = name
        self.unit = unit
        self.description = description
        self.boundaries = tuple(boundaries)  # as given: Prometheus writes 4 as le="4"
        self._lock = threading.Lock()
        self._series: list[HistogramSeries] = []

    def series(self, attributes: Mapping[str, AttributeValue]) -> HistogramSeries:
        """A new series for ``attributes``; the caller keeps it (one per attribute set)."""
        series = HistogramSeries(attributes, self.boundaries, self._lock)
        with self._lock:
            self._series.append(series)
        return series

    def snapshot(self) -> list[SeriesSnapshot]:
        """Every series observed at least once, consistently (taken under the lock)."""
        with self._lock:
            return [
                SeriesSnapshot(s.attributes, s.start_ns, tuple(s.counts), s.sum, s.min, s.max)
                for s in self._series
                if any(s.counts)
            ]


class HistogramFactory(Protocol):
    """Where local histograms are exported from (``server.metric_bridge.MetricBridge``)."""

    def create_histogram(
        self, name: str, unit: str, description: str, boundaries: Sequence[float]
    ) -> LocalHistogram: ...
