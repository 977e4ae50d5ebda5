"""A circuit breaker per served version: stop sending traffic to a version that fails.

A failure is a model execution that raised, or that produced NaN or infinity
in an output not declared ``allow_nonfinite`` (the registry's output guard
turns those into a failed execution). Failures are counted per request over a
sliding window of ``window_s`` one-second buckets. Once at least
``min_calls`` requests ran in the window and the failed share reaches
``failure_rate``, the breaker opens: the router sends the version's requests
to its fallback, or answers 503 with ``Retry-After`` when there is none.
After ``cooldown_s`` it turns half-open and lets ``probes`` requests through;
when they all succeed it closes, when one fails it opens again for twice as
long (up to ``max_cooldown_s``).

Invalid input, overload and expired deadlines never reach a model, so they
never count: only the model's own failures do. Everything here runs on the
event loop: plain integers, no locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from server.core.model_config import BreakerConfig


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


STATE_CODES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """A breaker opened or closed: what the audit log and the log record."""

    model: str
    version: int
    state: BreakerState
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


BreakerListener = Callable[[BreakerEvent], None]


class CircuitBreaker:
    """Whether one version takes traffic, from the outcomes of its recent executions."""

    __slots__ = (
        "_calls",
        "_clock",
        "_config",
        "_cooldown",
        "_failures",
        "_listener",
        "_model",
        "_probes_ok",
        "_probes_out",
        "_reason",
        "_stamps",
        "_state",
        "_until",
        "_version",
        "closed",
        "trips",
    )

    def __init__(
        self,
        config: BreakerConfig,
        model: str,
        version: int,
        listener: BreakerListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.closed = True  # read on every request: one attribute, no call
        self.trips = 0
        self._config = config
        self._model = model
        self._version = version
        self._listener = listener
        self._clock = clock
        self._state = BreakerState.CLOSED
        width = max(1, math.ceil(config.window_s))
        self._stamps = [-1] * width
        self._calls = [0] * width
        self._failures = [0] * width
        self._until = 0.0
        self._cooldown = config.cooldown_s
        self._probes_out = 0
        self._probes_ok = 0
        self._reason = ""

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._until:
            return BreakerState.HALF_OPEN  # the next request is a probe
        return self._state

    @property
    def reason(self) -> str:
        """Why the breaker last opened ("" while it never did)."""
        return self._reason

    def admit(self) -> bool:
        """Whether one more request may go to this version (a probe, when half-open)."""
        if self.closed:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN:
            if now < self._until:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probes_out = self._probes_ok = 0
            self._until = now + self._cooldown
        if self._probes_out < self._config.probes:
            self._probes_out += 1
            return True
        if now >= self._until:
            # The probes let through never ran (refused before compute, or cancelled):
            # let a new round through rather than stay half-open for ever.
            self._probes_out, self._probes_ok = 1, 0
            self._until = now + self._cooldown
            return True
        return False

    def retry_after_s(self) -> float:
        """Seconds until the breaker lets a probe through (0 when it would now)."""
        if self.closed:
            return 0.0
        return max(0.0, self._until - self._clock())

    def record(self, requests: int, ok: bool) -> None:
        """The outcome of one execution of ``requests`` requests."""
        if not self._config.enabled:
            return
        state = self._state
        if state is BreakerState.CLOSED:
            now = int(self._clock())
            slot = now % len(self._stamps)
            if self._stamps[slot] != now:
                self._stamps[slot] = now
                self._calls[slot] = self._failures[slot] = 0
            self._calls[slot] += requests
            if not ok:
                self._failures[slot] += requests
                self._check(now)
        elif state is BreakerState.HALF_OPEN:
            if not ok:
                self._open("a probe failed after the cooldown", {}, self._cooldown * 2)
                return
            self._probes_ok += requests
            if self._probes_ok >= self._config.probes:
                self._close()
        # OPEN: executions that were already queued when it opened; they prove nothing.

    def window(self) -> tuple[int, int]:
        """Requests executed and failed in the sliding window, now."""
        now = int(self._clock())
        oldest = now - len(self._stamps)
        calls = failures = 0
        for stamp, c, f in zip(self._stamps, self._calls, self._failures, strict=True):
            if stamp > oldest:
                calls += c
                failures += f
        return calls, failures

    def describe(self) -> dict[str, Any]:
        """The breaker as the traffic document and the metrics show it."""
        calls, failures = self.window()
        return {
            "state": self.state.value,
            "trips": self.trips,
            "window_requests": calls,
            "window_failures": failures,
            "retry_after_s": round(self.retry_after_s(), 3),
            "reason": self._reason,
        }

    def _check(self, now: int) -> None:
        calls, failures = self.window()
        config = self._config
        if calls >= config.min_calls and failures >= config.failure_rate * calls:
            self._open(
                f"{failures} of {calls} requests failed in the last {config.window_s:g} s "
                f"(threshold {config.failure_rate:.0%} of at least {config.min_calls})",
                {"requests": calls, "failures": failures, "failure_rate": failures / calls},
                config.cooldown_s,
            )

    def _open(self, reason: str, figures: dict[str, Any], cooldown: float) -> None:
        self._cooldown = min(cooldown, self._config.max_cooldown_s)
        self._state = BreakerState.OPEN
        self.closed = False
        self.trips += 1
        self._until = self._clock() + self._cooldown
        self._reason = reason
        figures = {**figures, "cooldown_s": self._cooldown, "trips": self.trips}
        self._tell(BreakerState.OPEN, reason, figures)

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self.closed = True
        self._cooldown = self._config.cooldown_s
        for slot in range(len(self._stamps)):
            self._stamps[slot] = -1
        self._tell(
            BreakerState.CLOSED,
            f"{self._probes_ok} probe requests succeeded",
            {"probes": self._probes_ok},
        )

    def _tell(self, state: BreakerState, reason: str, figures: dict[str, Any]) -> None:
        if self._listener is not None:
            self._listener(BreakerEvent(self._model, self._version, state, reason, figures))
