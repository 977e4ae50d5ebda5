"""Cumulative per-version statistics in the shape of Triton's statistics extension.

Updated only from the event loop, so plain integers suffice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    """A count and the total nanoseconds it took."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchSizeStats:
    """Per batch size (rows): how often it ran and how long compute took."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStats:
    """Everything /v2/models/{m}/versions/{v}/stats reports for one version."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    fallback_count: int = 0  # answers given for another version that could not answer
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)

    def record_request(self, ok: bool, duration_ns: int, reason: str | None = None) -> None:
        """One whole request answered (successfully or not)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        if ok:
            self.success.add(duration_ns)
        else:
            self.fail.add(duration_ns)
            key = reason or "error"
            self.failures_by_reason[key] = self.failures_by_reason.get(key, 0) + 1

    def record_execution(
        self, rows: int, requests: int, queue_s: tuple[float, ...], compute_ns: int
    ) -> None:
        """One model execution of ``rows`` rows serving ``requests`` requests."""
        self.inference_count += rows
        self.execution_count += 1
        for waited in queue_s:
            self.queue.add(int(waited * 1e9))
        self.compute_infer.add(compute_ns, requests)
        self.compute_input.add(0, requests)
        self.compute_output.add(0, requests)
        per_size = self.batches.get(rows)
        if per_size is None:
            per_size = self.batches[rows] = BatchSizeStats()
        per_size.compute_infer.add(compute_ns)
        per_size.compute_input.add(0)
        per_size.compute_output.add(0)
