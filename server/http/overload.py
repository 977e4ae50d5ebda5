"""A server-wide limit on requests in progress that adapts to how long they take.

On one event loop, requests in progress share the CPU: past the point where
it is saturated, each one more in progress adds its share of time to every
other's answer, and the excess waits in the loop and the sockets, where no
model queue sees it (at 2x load with 512 connections: 100 % 2xx, p99 8 s,
every request late). So the protocol counts the requests in progress and
measures how long each one stays (headers in -> answer out), and a
controller moves the limit every ``TICK_S``:

- mean time in the server over the target in two ticks running (a GC
  pause or one slow moment is let through) and over at least
  ``MIN_SAMPLES`` requests: the limit shrinks in proportion (at most by
  half a tick, never below ``floor``);
- under it: the limit grows by a tenth (up to ``ceiling``,
  ``limits.max_concurrent_requests``).

The target is ``target_s``, or twice the time a request takes when few are
in progress (measured in the ticks where at most ``floor`` were), whichever
is longer: a model that needs 50 ms per request is not shed down to the
floor for missing a 10 ms target, and an overloaded server, whose ticks
are all busy, does not raise its own target.

A request over the limit is answered 503 with Retry-After at once, for a
fraction of the work of an answer, so the excess is turned away instead of
making everyone late. Below saturation the mean stays under the target and
the limit sits at its ceiling: nothing is refused.
"""

from __future__ import annotations

TICK_S = 0.05
# Enough requests in progress to keep batches full and threads busy: below it, batches
# shrink, each row costs more, and shedding would cut throughput instead of waiting.
FLOOR = 64
MIN_SAMPLES = 10  # fewer answers in a tick say too little about the time they take


class AdaptiveLimit:
    """The limit and the measurements that move it (event-loop thread only)."""

    __slots__ = (
        "_count",
        "_over",
        "_quiet_s",
        "_total_s",
        "ceiling",
        "floor",
        "limit",
        "peak",
        "refused",
        "target_s",
    )

    def __init__(self, target_s: float, ceiling: int, floor: int = FLOOR) -> None:
        self.target_s = target_s
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.limit = ceiling
        self.refused = 0
        self.peak = 0  # most requests in progress seen at a request's start, this tick
        self._total_s = 0.0
        self._count = 0
        self._quiet_s = 0.0  # moving average of the mean in ticks with few in progress
        self._over = False  # the last tick's mean was over the target

    @property
    def target(self) -> float:
        """The mean time in the server the limit is steered to."""
        return max(self.target_s, 2.0 * self._quiet_s)

    def finished(self, seconds: float) -> None:
        """One answered request stayed ``seconds`` in the server."""
        self._total_s += seconds
        self._count += 1

    def adjust(self) -> None:
        """Move the limit from the requests answered since the last call."""
        count, total, peak = self._count, self._total_s, self.peak
        self._count, self._total_s, self.peak = 0, 0.0, 0
        mean = total / count if count else 0.0
        if count and peak <= self.floor:
            quiet = self._quiet_s
            self._quiet_s = mean if quiet == 0.0 else quiet + 0.1 * (mean - quiet)
        target = self.target
        over = count >= MIN_SAMPLES and mean > target
        was_over, self._over = self._over, over
        if over and was_over:
            self.limit = max(self.floor, int(self.limit * max(0.5, target / mean)))
        elif over:
            return  # once may be a pause: wait for the next tick
        elif self.limit < self.ceiling:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 10))
