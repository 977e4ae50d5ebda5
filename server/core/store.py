"""The fleet's shared state in Redis, behind short timeouts and a circuit.

What several processes or replicas must agree on (result-cache rows,
predictions waiting for their feedback label, traffic state) goes through this
one client. It never fails a request: a call that errors or takes longer than
``redis.timeout_ms`` opens the circuit, and for ``redis.retry_after_s`` every
call answers "unavailable" at once (``None``, or nothing written) so that each
process carries on with its local state. The outage is logged once, counted,
and its end logged too.

Writes that no caller waits for (cache fills, stored predictions) go through a
bounded queue drained by one background task in pipelines; when the queue is
full the write is dropped and counted, never awaited on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from server.config import RedisSettings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("sluice.store")

WRITE_QUEUE = 10_000
WRITE_BATCH = 256


@dataclass(slots=True)
class StoreStats:
    """What the metrics export about the shared store."""

    errors: int = 0  # failed or timed-out calls
    skipped: int = 0  # calls not made because the circuit was open
    dropped_writes: int = 0  # background writes dropped on a full queue
    available: bool = True


@dataclass(frozen=True, slots=True)
class Write:
    key: str
    value: bytes | None  # None deletes the key
    ttl_s: float


class SharedStore:
    """A Redis client that degrades instead of failing."""

    def __init__(
        self, settings: RedisSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert settings.url is not None
        self.prefix = settings.key_prefix
        self._timeout = settings.timeout_ms / 1000
        self._retry_after = settings.retry_after_s
        self._clock = clock
        # Imported here: redis-py pulls in the OpenTelemetry SDK, which the core does not
        # load unless Redis is configured (tests/core/test_core_boundary.py).
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._open_until = 0.0
        self._writes: asyncio.Queue[Write] = asyncio.Queue(maxsize=WRITE_QUEUE)
        self._writer: asyncio.Task[None] | None = None
        self.stats = StoreStats()

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def available(self) -> bool:
        return self._clock() >= self._open_until

    # -- calls a request may wait for (bounded by the timeout) -------------------------

    async def mget(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """The values of ``keys`` (None for absent ones); None when Redis is unavailable."""
        if not self._ready():
            return None
        try:
            async with asyncio.timeout(self._timeout):
                values = cast(list[bytes | None], await self._client.mget(keys))
        except self._errors as exc:
            self._failed(exc)
            return None
        self._succeeded()
        return values

    async def take(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Read and delete each key atomically (GETDEL): whoever takes a value has it alone."""
        if not self._ready():
            return None
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.getdel(key)
                values = cast(list[bytes | None], await pipe.execute())
        except self._errors as exc:
            self._failed(exc)
            return None
        self._succeeded()
        return values

    async def get(self, key: str) -> bytes | None:
        found = await self.mget([key])
        return found[0] if found else None

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """Write now; False when Redis is unavailable."""
        if not self._ready():
            return False
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(key, value, px=None if ttl_s is None else int(ttl_s * 1000))
        except self._errors as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    # -- writes nobody waits for ------------------------------------------------------

    def delete_later(self, key: str) -> None:
        """Queue a delete, as ``put_later`` queues a write."""
        self.put_later(key, None, 0.0)

    def put_later(self, key: str, value: bytes | None, ttl_s: float) -> None:
        """Queue a write; dropped (and counted) when Redis is down or the queue is full."""
        if not self.available:
            self.stats.skipped += 1
            return
        try:
            self._writes.put_nowait(Write(key, value, ttl_s))
        except asyncio.QueueFull:
            self.stats.dropped_writes += 1
            return
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._writes.get()]
            while len(batch) < WRITE_BATCH and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            try:
                await self._send(batch)
            finally:
                for _ in batch:
                    self._writes.task_done()

    async def _send(self, batch: list[Write]) -> None:
        if not self._ready():
            self.stats.dropped_writes += len(batch)
            return
        try:
            async with asyncio.timeout(self._timeout * 4):
                pipe = self._client.pipeline(transaction=False)
                for write in batch:
                    if write.value is None:
                        pipe.delete(write.key)
                    else:
                        pipe.set(write.key, write.value, px=int(write.ttl_s * 1000))
                await pipe.execute()
        except self._errors as exc:
            self.stats.dropped_writes += len(batch)
            self._failed(exc)
            return
        self._succeeded()

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) until every queued write was sent or dropped."""
        if self._writer is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._writes.join()
        except TimeoutError:
            log.warning(
                "%d shared-store writes still queued after %.0f s", self._writes.qsize(), timeout_s
            )

    async def close(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        await self._client.aclose()

    # -- the circuit --------------------------------------------------------------------

    def _ready(self) -> bool:
        if self._clock() < self._open_until:
            self.stats.skipped += 1
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self._open_until = self._clock() + self._retry_after
        if self.stats.available:
            log.warning(
                "Redis unavailable (%s: %s): carrying on with local state; retrying in %.0f s",
                type(exc).__name__,
                exc,
                self._retry_after,
            )
        self.stats.available = False

    def _succeeded(self) -> None:
        if not self.stats.available:
            log.info("Redis answers again: shared state resumed")
        self.stats.available = True
