"""What closed- and open-loop drivers share: connecting, timeouts, the window, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any, Literal

from loadtest.bodies import RequestPool
from loadtest.check import OutputChecker
from loadtest.http import Connection, ErrorKind, connect_error_kind
from loadtest.stats import Recorder, RunResult
from loadtest.target import Target

FIRST_BACKOFF_S = 0.01
MAX_BACKOFF_S = 0.25
MAX_WATCH_INTERVAL_S = 0.1


class Driver(ABC):
    """Base of the two load shapes; subclasses implement ``on_response``/``on_closed``."""

    mode: Literal["closed", "open"]

    def __init__(
        self,
        target: Target,
        pool: RequestPool,
        timeout: float,
        checker: OutputChecker | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.pool = pool
        self.requests = pool.requests
        self.count = len(pool.requests)
        self.cursor = 0
        self.timeout = timeout
        self.checker = checker
        if checker is not None and pool.row_ids is None:
            raise ValueError("checking outputs needs a pool built from rows")
        self.rec = Recorder()
        self.conns: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.stopping = False
        self.end = float("inf")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def connect(self, until: float) -> Connection | None:
        """A new connection, retrying with backoff; ``None`` once ``until`` or shutdown comes.

        Every failed attempt is counted, as a client would see each one fail.
        """
        backoff = FIRST_BACKOFF_S
        keep_body = self.checker is not None
        while not self.stopping and time.monotonic() < until:
            attempt = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout):
                    _, conn = await self.loop.create_connection(
                        lambda: Connection(self, keep_body), self.target.host, self.target.port
                    )
            except TimeoutError:
                self.rec.error(ErrorKind.TIMEOUT, attempt, time.monotonic())
            except OSError as exc:
                self.rec.error(connect_error_kind(exc), attempt, time.monotonic())
            else:
                if self.stopping:
                    conn.close()
                    return None
                self.conns.add(conn)
                return conn
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        return None

    def next_request(self, conn: Connection) -> bytes:
        index = self.cursor
        self.cursor = index + 1 if index + 1 < self.count else 0
        conn.tag = index
        return self.requests[index]

    def record(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        done = time.monotonic()
        if (
            self.rec.response(conn.started, conn.sent, done, status)
            and self.checker is not None
            and body is not None
            and self.pool.row_ids is not None
        ):
            self.rec.check(self.checker.check(self.pool.row_ids[conn.tag], body, split))

    async def watch(self) -> None:
        """Abort requests that outlived the timeout; the lost request counts as ``timeout``."""
        interval = min(self.timeout / 4, MAX_WATCH_INTERVAL_S)
        while not self.stopping:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.conns):
                if conn.busy and now - conn.sent > self.timeout:
                    conn.abort(ErrorKind.TIMEOUT)

    async def drive(self, deadline: float) -> None:
        """Wait for the subclass to call ``finish`` (or the deadline), then shut down."""
        self.spawn(self.watch())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await asyncio.shield(self.done)
        self.stopping = True
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.busy:
                self.rec.error(ErrorKind.TIMEOUT, conn.started, now)
                conn.abort(ErrorKind.TIMEOUT)
            else:
                conn.close()
        self.conns.clear()
        self.abandon(now)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @abstractmethod
    def abandon(self, now: float) -> None:
        """Account for requests still queued (never sent) at shutdown."""

    async def measure(self, warmup: float, duration: float, **shape: Any) -> RunResult:
        """Drive load for ``warmup + duration``, measuring the last ``duration``; ``shape``
        describes the load for the result.
        """
        if duration <= 0 or warmup < 0:
            raise ValueError("duration must be positive and warmup not negative")
        cpu0, wall0 = time.process_time(), time.monotonic()
        start = wall0 + warmup
        self.end = start + duration
        self.rec.open_window(start, self.end)
        self.start()
        await self.drive(self.end + self.timeout + MAX_WATCH_INTERVAL_S)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        return self.rec.result(
            mode=self.mode,
            target=self.target.label,
            rows_per_request=self.pool.rows_per_request,
            client_cpu_util=cpu / wall if wall > 0 else 0.0,
            **shape,
        )

    @abstractmethod
    def start(self) -> None:
        """Begin sending; called once the window is set."""

    @abstractmethod
    def on_response(self, conn: Connection, status: int, body: bytes | None, split: int) -> None:
        """``ResponseHandler``: a response arrived on ``conn``."""

    @abstractmethod
    def on_closed(self, conn: Connection, kind: ErrorKind | None) -> None:
        """``ResponseHandler``: ``conn`` is gone."""
