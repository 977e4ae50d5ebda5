"""Recording responses during a run and summarising them afterwards.

Latencies go into flat integer arrays while the run is hot (an append is far
cheaper than an HDR record) and into an HDR histogram at microsecond resolution
once it is over.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from hdrh.histogram import HdrHistogram

from loadtest.http import ErrorKind

HIGHEST_US = 3_600_000_000
SIGNIFICANT_DIGITS = 3


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles in milliseconds from an HDR histogram of microseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, hist: HdrHistogram) -> LatencySummary:
        count = int(hist.get_total_count())
        if count == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)

        def at(percentile: float) -> float:
            return float(hist.get_value_at_percentile(percentile)) / 1000.0

        return cls(
            count,
            float(hist.get_mean_value()) / 1000.0,
            at(50.0),
            at(90.0),
            at(99.0),
            at(99.9),
            float(hist.get_max_value()) / 1000.0,
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
        }


def histogram_of(samples_us: array[int]) -> HdrHistogram:
    hist = HdrHistogram(1, HIGHEST_US, SIGNIFICANT_DIGITS)
    if samples_us:
        values, counts = np.unique(
            np.clip(np.frombuffer(samples_us, dtype=np.int64), 1, HIGHEST_US), return_counts=True
        )
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            hist.record_value(value, count)
    return hist


@dataclass(slots=True)
class RunResult:
    """Everything one run measured.

    Counts, statuses, errors and latencies cover the requests whose intended send
    time fell in the measured window, however late they finished. ``latency`` is
    from that intended time (the send time in closed loop), ``service`` from the
    actual write; both cover 2xx only. Throughputs count completions inside the
    window, so an overloaded server shows its capacity, not the offered rate.
    """

    mode: Literal["closed", "open"]
    target: str
    connections: int
    offered_rps: float | None
    arrival: str | None
    rows_per_request: int
    duration_s: float
    completed: int
    done_in_window: int
    ok_in_window: int
    ok: int
    statuses: dict[int, int]
    errors: dict[str, int]
    latency: LatencySummary
    service: LatencySummary
    checked: int = 0
    mismatches: int = 0
    client_cpu_util: float = 0.0
    drain_s: float = 0.0
    latency_histogram: HdrHistogram | None = field(default=None, repr=False, compare=False)
    service_histogram: HdrHistogram | None = field(default=None, repr=False, compare=False)

    def count_over(self, threshold_ms: float, *, service: bool = False) -> int:
        """How many 2xx responses took longer than ``threshold_ms`` (from intended or
        actual send time), to HDR precision.
        """
        hist = self.service_histogram if service else self.latency_histogram
        if hist is None:
            return 0
        limit = threshold_ms * 1000.0
        return sum(
            int(item.count_at_value_iterated_to)
            for item in hist.get_recorded_iterator()
            if hist.get_lowest_equivalent_value(item.value_iterated_to) > limit
        )

    @property
    def throughput_rps(self) -> float:
        """Responses of any status per second."""
        return self.done_in_window / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok_rps(self) -> float:
        """2xx responses per second: the goodput."""
        return self.ok_in_window / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.ok_rps * self.rows_per_request

    @property
    def failed(self) -> int:
        """Requests that got no 2xx: other statuses plus transport errors."""
        return self.completed - self.ok + sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        hist = self.latency_histogram
        return {
            "mode": self.mode,
            "target": self.target,
            "connections": self.connections,
            "offered_rps": self.offered_rps,
            "arrival": self.arrival,
            "rows_per_request": self.rows_per_request,
            "duration_s": self.duration_s,
            "completed": self.completed,
            "ok": self.ok,
            "throughput_rps": self.throughput_rps,
            "ok_rps": self.ok_rps,
            "rows_per_s": self.rows_per_s,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(sorted(self.errors.items())),
            "latency": self.latency.to_dict(),
            "service": self.service.to_dict(),
            "checked": self.checked,
            "mismatches": self.mismatches,
            "client_cpu_util": self.client_cpu_util,
            "drain_s": self.drain_s,
            "latency_hdr": hist.encode().decode("ascii") if hist is not None else None,
        }


class Recorder:
    """Counts what happens to requests whose (intended) start lies in the measured window."""

    __slots__ = (
        "checked",
        "done_in_window",
        "errors",
        "last_done",
        "latency_us",
        "mismatches",
        "ok_in_window",
        "service_us",
        "statuses",
        "window_end",
        "window_start",
    )

    def __init__(self) -> None:
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.last_done = 0.0
        self.latency_us: array[int] = array("q")
        self.service_us: array[int] = array("q")
        self.statuses: dict[int, int] = {}
        self.errors: Counter[str] = Counter()
        self.checked = 0
        self.mismatches = 0
        self.done_in_window = 0
        self.ok_in_window = 0

    def open_window(self, start: float, end: float) -> None:
        self.window_start = start
        self.window_end = end
        self.last_done = start

    def in_window(self, started: float) -> bool:
        return self.window_start <= started < self.window_end

    def response(self, started: float, sent: float, done: float, status: int) -> bool:
        """Count a response; returns whether its request belongs to the window."""
        if self.window_start <= done < self.window_end:
            self.done_in_window += 1
            if 200 <= status < 300:
                self.ok_in_window += 1
        if not self.window_start <= started < self.window_end:
            return False
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.latency_us.append(int((done - started) * 1e6))
            self.service_us.append(int((done - sent) * 1e6))
        if done > self.last_done:
            self.last_done = done
        return True

    def error(self, kind: ErrorKind, started: float, done: float) -> None:
        if self.window_start <= started < self.window_end:
            self.errors[kind.value] += 1
            if done > self.last_done:
                self.last_done = done

    def check(self, passed: bool) -> None:
        self.checked += 1
        if not passed:
            self.mismatches += 1

    def result(
        self,
        *,
        mode: Literal["closed", "open"],
        target: str,
        connections: int,
        offered_rps: float | None,
        arrival: str | None,
        rows_per_request: int,
        client_cpu_util: float,
    ) -> RunResult:
        """Summarise the window."""
        latency_hist = histogram_of(self.latency_us)
        service_hist = histogram_of(self.service_us)
        completed = sum(self.statuses.values())
        return RunResult(
            mode=mode,
            target=target,
            connections=connections,
            offered_rps=offered_rps,
            arrival=arrival,
            rows_per_request=rows_per_request,
            duration_s=self.window_end - self.window_start,
            completed=completed,
            done_in_window=self.done_in_window,
            ok_in_window=self.ok_in_window,
            ok=sum(v for k, v in self.statuses.items() if 200 <= k < 300),
            statuses=dict(self.statuses),
            errors=dict(self.errors),
            latency=LatencySummary.of(latency_hist),
            service=LatencySummary.of(service_hist),
            checked=self.checked,
            mismatches=self.mismatches,
            client_cpu_util=client_cpu_util,
            drain_s=max(self.last_done - self.window_end, 0.0),
            latency_histogram=latency_hist,
            service_histogram=service_hist,
        )
