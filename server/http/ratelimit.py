"""Rate limits per API key (per client address without keys): a sliding-window counter.

Each identity has a counter for the current window and the previous one; a
request is let in while ``previous * (share of the previous window still in
view) + current`` stays under the limit (the algorithm of ``limits``'
sliding-window counter and of Cloudflare's). Refusals are 429 with
``Retry-After``.

One process counts in memory (``LocalWindows``). With ``redis.url`` set the
counters live in Redis, shared by every replica, through the ``limits``
library's atomic scripts (``SharedWindows``). A Redis call that fails or times
out never fails the request: it is decided by the local counters instead, the
outage is logged once and counted, and Redis is not called again for
``redis.retry_after_s``.

Why not ``limits``' memory storage for the local case: it costs 3.5 us a hit
(measured: sliding window, sync) and restarts a timer thread every 10 ms that
walks every identity under the GIL; a dict of two counters costs a fraction of that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import RedisSettings
from server.http.auth import KEY_SCOPE, ApiKey
from server.http.errors import error_response

if TYPE_CHECKING:
    from limits import RateLimitItem
    from limits.aio.strategies import SlidingWindowCounterRateLimiter

log = logging.getLogger("sluice.security")

Rate = tuple[int, float]  # requests per period (seconds)
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
MAX_IDENTITIES = 100_000  # counters kept in memory; stale ones go first


class _Counter:
    __slots__ = ("current", "previous", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.previous = 0
        self.current = 0


class LocalWindows:
    """Sliding-window counters in this process, at most ``capacity`` identities."""

    def __init__(
        self, capacity: int = MAX_IDENTITIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._counters: dict[tuple[str, float], _Counter] = {}
        self._capacity = capacity
        self._clock = clock

    def __len__(self) -> int:
        return len(self._counters)

    def hit(self, identity: str, rate: Rate) -> float:
        """0 when the request may go ahead (and counts it), else seconds until one may."""
        limit, period = rate
        now = self._clock()
        window = int(now // period)
        key = (identity, period)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self._capacity:
                self._make_room(window, period)
            counter = self._counters[key] = _Counter(window)
        elif counter.window != window:
            counter.previous = counter.current if counter.window == window - 1 else 0
            counter.current = 0
            counter.window = window
        into = (now - window * period) / period  # share of the current window gone by
        if counter.previous * (1.0 - into) + counter.current + 1 <= limit:
            counter.current += 1
            return 0.0
        return _wait(limit, period, into, counter.previous, counter.current)

    def _make_room(self, window: int, period: float) -> None:
        # Counters two windows old are empty in effect; if that frees nothing, forget
        # the oldest quarter (a forgotten identity starts afresh: fails open, stays bounded).
        stale = [k for k, c in self._counters.items() if c.window < window - 1 and k[1] == period]
        if len(stale) < self._capacity // 4:
            stale = list(self._counters)[: self._capacity // 4]
        for k in stale:
            del self._counters[k]


def _wait(limit: int, period: float, into: float, previous: int, current: int) -> float:
    """Seconds until ``previous * (1 - into) + current + 1 <= limit`` holds again."""
    if current + 1 <= limit and previous > 0:
        # Within this window, once enough of the previous one has slid out of view.
        needed = 1.0 - (limit - current - 1) / previous
        return max((needed - into) * period, 0.001)
    # Next window: the current count becomes the previous one.
    if current <= 0:
        return (1.0 - into) * period
    needed = max(0.0, 1.0 - (limit - 1) / current)
    return (1.0 - into + needed) * period


@dataclass(slots=True)
class RateLimitStats:
    """What the metrics export about rate limiting."""

    refused: int = 0
    store_errors: int = 0  # Redis calls that failed or timed out
    local_decisions: int = 0  # decided here because Redis was unavailable


class SharedWindows:
    """Counters in Redis (``limits``, sliding-window counter), local ones while it is down."""

    def __init__(
        self,
        settings: RedisSettings,
        local: LocalWindows,
        stats: RateLimitStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.url is not None
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from redis.exceptions import RedisError

        self._timeout = settings.timeout_ms / 1000
        self._retry_after = settings.retry_after_s
        self._storage = RedisStorage(
            "async+" + settings.url,
            implementation="redispy",
            key_prefix=settings.key_prefix + "ratelimit",
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
        )
        self._limiter: SlidingWindowCounterRateLimiter = SlidingWindowCounterRateLimiter(
            self._storage
        )
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._items: dict[Rate, RateLimitItem] = {}
        self._local = local
        self._stats = stats
        self._clock = clock
        self._open_until = 0.0  # the circuit: no Redis calls before this

    async def hit(self, identity: str, rate: Rate) -> float:
        if self._clock() < self._open_until:
            self._stats.local_decisions += 1
            return self._local.hit(identity, rate)
        item = self._items.get(rate) or self._item(rate)
        try:
            async with asyncio.timeout(self._timeout * 2):
                if await self._limiter.hit(item, identity):
                    return 0.0
                stats = await self._limiter.get_window_stats(item, identity)
        except self._errors as exc:
            self._failed(exc)
            self._stats.local_decisions += 1
            return self._local.hit(identity, rate)
        if self._open_until:
            log.warning("rate limits are shared through Redis again")
            self._open_until = 0.0
        return max(stats.reset_time - time.time(), 0.001)

    def _item(self, rate: Rate) -> RateLimitItem:
        from limits import RateLimitItemPerSecond

        item = self._items[rate] = RateLimitItemPerSecond(rate[0], max(1, round(rate[1])))
        return item

    def _failed(self, exc: BaseException) -> None:
        self._stats.store_errors += 1
        if not self._open_until:
            # Once per outage; the exception's type only (a URL could carry a password).
            log.warning(
                "rate limits: Redis unavailable (%s); limiting in this process for %.0f s "
                "at a time until it answers",
                type(exc).__name__,
                self._retry_after,
            )
        self._open_until = self._clock() + self._retry_after

    async def close(self) -> None:
        bridge: Any = self._storage.bridge
        client = getattr(bridge, "storage", None)
        if client is not None:
            await client.aclose()


class RateLimiter:
    """The per-identity limits in force and where they are counted."""

    def __init__(
        self,
        default: Rate | None,
        redis: RedisSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.stats = RateLimitStats()
        self.local = LocalWindows(clock=clock)
        self.shared = (
            SharedWindows(redis, self.local, self.stats, clock)
            if redis is not None and redis.url is not None
            else None
        )

    def bind(self, meter: Meter) -> None:
        """Export the counters (read when metrics are collected, never per request)."""
        stats = self.stats

        def observe(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda options: [Observation(read())]

        meter.create_observable_counter(
            "http.server.rate_limit.refused",
            [observe(lambda: stats.refused)],
            unit="{request}",
            description="Requests refused with 429 by the rate limit",
        )
        meter.create_observable_counter(
            "http.server.rate_limit.store_errors",
            [observe(lambda: stats.store_errors)],
            unit="{call}",
            description="Rate-limit calls to Redis that failed or timed out",
        )
        meter.create_observable_counter(
            "http.server.rate_limit.local_decisions",
            [observe(lambda: stats.local_decisions)],
            unit="{request}",
            description="Requests limited in this process because Redis was unavailable",
        )

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()


class RateLimit:
    """The rate-limit layer; it sits inside authentication, which names the key."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        key: ApiKey | None = scope.get(KEY_SCOPE)
        if key is not None:
            identity = "key:" + key.id
            rate = key.rate or limiter.default
        else:
            identity = "ip:" + client_identity(scope.get("client"))
            rate = limiter.default
        if rate is not None:
            shared = limiter.shared
            wait = limiter.local.hit(identity, rate) if shared is None else (
                await shared.hit(identity, rate)
            )  # fmt: skip
            if wait:
                limiter.stats.refused += 1
                await _too_many(key, rate, wait, scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _too_many(
    key: ApiKey | None, rate: Rate, wait: float, scope: Scope, receive: Receive, send: Send
) -> None:
    seconds = max(1, math.ceil(wait))
    who = f"key '{key.id}'" if key is not None else "this client address"
    limit, period = rate
    message = (
        f"rate limit of {limit} requests per {period:g} s exceeded for {who}; retry in {seconds} s"
    )
    await error_response(429, message, {"Retry-After": str(seconds)})(scope, receive, send)


def client_identity(client: tuple[str, int] | None) -> str:
    """The client's address; IPv6 clients by their /64, which one host usually holds whole."""
    if client is None:
        return "unknown"
    host = client[0]
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network(f"{host}/64", strict=False).network_address) + "/64"
    except ValueError:
        return host
