"""Open loop: requests at a fixed offered rate, latency counted from the intended send time.

A request's clock starts when the schedule says it should be sent, not when a
connection is free to send it. When every connection is busy, requests wait
in a queue and that wait is part of their latency, so a server that stalls
shows the stall in every request scheduled during it, not only in the few that
were on the wire (coordinated omission, as wrk2 corrects it).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Literal

from loadtest.bodies import RequestPool
from loadtest.check import OutputChecker
from loadtest.driver import Driver
from loadtest.http import Connection, ErrorKind
from loadtest.target import Target

SPIN_S = 0.0011

Arrival = Literal["constant", "poisson"]
ARRIVALS: tuple[Arrival, ...] = ("constant", "poisson")


class OpenDriver(Driver):
    """A timer releases every request that is due; free connections take them at once,
    the rest queue (oldest first) for the next connection that frees up.
    """

    mode = "open"

    def __init__(
        self,
        target: Target,
        pool: RequestPool,
        rate: float,
        connections: int,
        arrival: Arrival,
        timeout: float,
        checker: OutputChecker | None,
        seed: int = 0,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}")
        super().__init__(target, pool, timeout, checker)
        self.rate = rate
        self.connections = connections
        self.arrival = arrival
        self.random = random.Random(seed)
        self.idle: list[Connection] = []
        self.pending: deque[float] = deque()
        self.in_flight = 0
        self.next_at = 0.0
        self.scheduled_all = False
        self.timer: asyncio.Handle | None = None

    def _gap(self) -> float:
        if self.arrival == "poisson":
            return self.random.expovariate(self.rate)
        return 1.0 / self.rate

    def start(self) -> None:
        self.next_at = time.monotonic()
        for _ in range(self.connections):
            self.spawn(self._open_one())
        self._tick()

    async def _open_one(self) -> None:
        conn = await self.connect(float("inf"))
        if conn is not None:
            self._release(conn)

    def _tick(self) -> None:
        self.timer = None
        now = time.monotonic()
        due = self.next_at
        end = self.end
        idle = self.idle
        while due <= now and due < end:
            if idle:
                self._send(idle.pop(), due)
            else:
                self.pending.append(due)
            due += self._gap()
        self.next_at = due
        if due < end and not self.stopping:
            # Loop timers fire on millisecond ticks, often late; a late send is charged
            # to the server. So sleep until just before the send is due, then poll.
            wait = due - time.monotonic()
            if wait > SPIN_S:
                self.timer = self.loop.call_later(wait - SPIN_S, self._tick)
            else:
                self.timer = self.loop.call_soon(self._tick)
        else:
            self.scheduled_all = True
            self._maybe_finish()

    def _send(self, conn: Connection, intended: float) -> None:
        request = self.next_request(conn)
        conn.started = intended
        conn.sent = time.monotonic()
        self.in_flight += 1
        conn.send(request)

    def _release(self, conn: Connection) -> None:
        if self.pending:
            self._send(conn, self.pending.popleft())
        else:
            self.idle.append(conn)
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.scheduled_all and not self.pending and self.in_flight == 0:
            self.finish()

    def on_response(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        self.in_flight -= 1
        self.record(conn, status, body, split)
        if conn.is_open:
            self._release(conn)

    def on_closed(self, conn: Connection, kind: ErrorKind | None) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if kind is not None:
            self.in_flight -= 1
            self.rec.error(kind, conn.started, time.monotonic())
        if self.stopping:
            return
        if not self.scheduled_all or self.pending:
            self.spawn(self._open_one())
        self._maybe_finish()

    def abandon(self, now: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        # Never sent before the deadline: from the client's side these timed out.
        for intended in self.pending:
            self.rec.error(ErrorKind.TIMEOUT, intended, now)
        self.pending.clear()
