"""One server's sweep of its connections and tick of its adaptive limit.

Shared by every connection of a server (``server.http.protocol`` keeps one per
uvicorn server state): once every ``SWEEP_S`` it cuts off connections past
their phase's deadline and logs body-budget refusals; every ``TICK_S`` it moves
the limit on requests in progress (``server.http.overload``). It also holds
the body bytes of requests in progress, all connections together, and those of
connections lost while their app still ran. Its timers run only while there
are connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from server.http.overload import TICK_S, AdaptiveLimit

if TYPE_CHECKING:
    from server.http.protocol import ConnectionLimits

log = logging.getLogger("sluice.http")

SWEEP_S = 1.0


class Sweeper:
    """Once a second, cuts off the connections of one server past their deadline; every
    ``TICK_S`` moves the adaptive limit on requests in progress."""

    def __init__(
        self, connections: set[Any], loop: asyncio.AbstractEventLoop, limits: ConnectionLimits
    ) -> None:
        self._connections = connections
        self._loop = loop
        self.body_bytes = 0  # received and held by requests in progress, all connections
        self.body_refusals = 0  # since the last sweep, which logs them
        self._budget = limits.body_budget
        # Bodies of connections lost while their app still ran: charged until it returns.
        self._held: list[tuple[Any, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        # A fixed limit when there is no target: the same object, never moved.
        self.limit = AdaptiveLimit(limits.target_latency_s, limits.max_concurrent_requests)
        self._adaptive = limits.target_latency_s is not None
        # The clock as of the last tick or sweep, for deadlines (seconds long, checked once
        # a second): no clock read per request.
        self.now = self._ticked = time.monotonic()

    def ensure(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)
        if self._ticker is None and self._adaptive:
            self._ticker = self._loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        now = self.now = time.monotonic()
        self.limit.adjust(now - self._ticked)
        self._ticked = now
        if self._connections:
            self._ticker = self._loop.call_later(TICK_S, self._tick)

    def hold(self, cycle: Any, size: int) -> None:
        """``size`` body bytes stay charged until ``cycle``'s app has returned."""
        self._held.append((cycle, size))
        self.ensure()

    def _sweep(self) -> None:
        self._timer = None
        now = self.now = time.monotonic()
        for connection in list(self._connections):
            check = getattr(connection, "check_deadline", None)  # GuardedHttpProtocol's
            if check is not None:
                check(now)
        if self.body_refusals:
            log.warning(
                "refused %d request(s): the bodies of requests in progress would exceed "
                "limits.max_body_bytes_in_flight (%d bytes)",
                self.body_refusals,
                self._budget,
            )
            self.body_refusals = 0
        if self._held:
            running = []
            for cycle, size in self._held:
                # uvicorn's run_asgi swaps on_response for a no-op once the app returned.
                if getattr(cycle.on_response, "__self__", None) is None:
                    self.body_bytes -= size
                else:
                    running.append((cycle, size))
            self._held = running
        if self._connections or self._held:
            self.ensure()
