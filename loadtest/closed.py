"""Closed loop: N clients, each on its own connection, sending back to back."""

from __future__ import annotations

import time

from loadtest.bodies import RequestPool
from loadtest.check import OutputChecker
from loadtest.driver import Driver
from loadtest.http import Connection, ErrorKind
from loadtest.target import Target


class ClosedDriver(Driver):
    """Each client sends its next request from inside the previous response's callback,
    so the loop never wakes a coroutine per request.
    """

    mode = "closed"

    def __init__(
        self,
        target: Target,
        pool: RequestPool,
        concurrency: int,
        timeout: float,
        checker: OutputChecker | None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        super().__init__(target, pool, timeout, checker)
        self.concurrency = concurrency
        self.active = concurrency

    def start(self) -> None:
        for _ in range(self.concurrency):
            self.spawn(self._client())

    async def _client(self) -> None:
        conn = await self.connect(self.end)
        if conn is None:
            self._retire(None)
        else:
            self._send(conn, time.monotonic())

    def _send(self, conn: Connection, now: float) -> None:
        if now >= self.end:
            self._retire(conn)
            return
        request = self.next_request(conn)
        conn.started = conn.sent = now
        conn.send(request)

    def _retire(self, conn: Connection | None) -> None:
        if conn is not None:
            self.conns.discard(conn)
            conn.close()
        self.active -= 1
        if self.active == 0:
            self.finish()

    def abandon(self, now: float) -> None:
        """Nothing to do: a closed-loop client has no queue."""

    def on_response(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        self.record(conn, status, body, split)
        if conn.is_open:
            self._send(conn, time.monotonic())

    def on_closed(self, conn: Connection, kind: ErrorKind | None) -> None:
        if conn not in self.conns:
            return  # retired or shut down: its slot is already accounted for
        self.conns.discard(conn)
        if kind is not None:
            self.rec.error(kind, conn.started, time.monotonic())
        if self.stopping:
            return
        if time.monotonic() < self.end:
            self.spawn(self._client())
        else:
            self._retire(None)
