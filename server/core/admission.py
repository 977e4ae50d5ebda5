"""Admission on queueing delay: refuse what would wait too long, before it is computed.

Shedding by queue length alone lets every accepted request wait as long as
the queue is deep (at 2x load the queue is always full, and every answer
is slow). Here the measure is time, as in CoDel: each model has a target
queueing delay, and

- at submit, a request whose predicted wait (the rows ahead of it, in
  batches, times the recent batch time) exceeds the target is refused at
  once (503 with Retry-After): the excess is turned away immediately;
- at dequeue, once requests have been waiting longer than the target for
  ``INTERVAL_S`` (CoDel's interval: a burst or one slow batch is let
  through), each one that did is refused before compute, until one is
  dequeued within the target again.

The target is the model's own when set; else it adapts to the model: its
batching delay plus ``BATCHES`` recent batch times, and at least
``FLOOR_S`` (a model whose batch takes 40 ms, or that holds requests 20 ms
to form batches, cannot promise anyone 20 ms, and must not shed all its
traffic trying).
"""

from __future__ import annotations

import math

# Below this a queue is not worth shedding for. CoDel's 5 ms shed 1.5 % of requests at
# 64 closed-loop clients (p99 ~7 ms: full load, not overload) on the 2-core machine;
# 20 ms sheds nothing there and still bounds an overloaded queue.
FLOOR_S = 0.02
INTERVAL_S = 0.1  # CoDel's interval: how long the delay must stay over the target
BATCHES = 4.0  # an adaptive target covers this many batch times
_ALPHA = 0.1  # weight of the newest batch in the moving average


class DelayAdmission:
    """The admission rule of one model version's queue (loop thread only)."""

    __slots__ = ("_above_since", "_batch_s", "_delay_s", "_fixed", "_slots", "dropped", "refused")

    def __init__(
        self, target_s: float | None = None, slots: int = 1, batching_delay_s: float = 0.0
    ) -> None:
        self._fixed = target_s  # None: adaptive; math.inf: admission off
        self._delay_s = batching_delay_s
        self._above_since = -1.0  # when dequeued requests started waiting past the target
        self._slots = max(1, slots)
        self._batch_s = 0.0  # moving average of one batch's compute time; 0 until known
        self.refused = 0  # refused at submit
        self.dropped = 0  # refused at dequeue, having waited past the target

    @property
    def target_s(self) -> float:
        if self._fixed is not None:
            return self._fixed
        return max(FLOOR_S, self._delay_s + BATCHES * self._batch_s)

    def computed(self, seconds: float) -> None:
        """One batch took ``seconds`` of compute."""
        self._batch_s = _moved(self._batch_s, seconds)

    def predicted_wait(self, rows_ahead: int, batch_rows: int) -> float:
        """Seconds a request would queue behind ``rows_ahead`` rows (0 when nothing is known)."""
        if rows_ahead <= 0 or self._batch_s == 0.0:
            return 0.0
        batches = math.ceil(rows_ahead / batch_rows)
        return batches * self._batch_s / self._slots

    def admits(self, rows_ahead: int, batch_rows: int) -> bool:
        """At submit: False refuses the request at once."""
        if self.predicted_wait(rows_ahead, batch_rows) <= self.target_s:
            return True
        self.refused += 1
        return False

    def unqueued(self) -> None:
        """A request computed without waiting in the queue: the wait is below target."""
        self._above_since = -1.0

    def overdue(self, waited_s: float, now: float) -> bool:
        """At dequeue: True refuses a request that waited past the target, once they have
        for ``INTERVAL_S``."""
        if waited_s <= self.target_s:
            self._above_since = -1.0
            return False
        if self._above_since < 0:
            self._above_since = now
        if now - self._above_since < INTERVAL_S:
            return False
        self.dropped += 1
        return True


def _moved(average: float, sample: float) -> float:
    return sample if average == 0.0 else average + _ALPHA * (sample - average)
