"""The access layers the settings ask for, in their order, and their lifespan hooks.

Outermost first: the server-wide admission limit, authentication, rate
limits. A layer the settings do not ask for is not built, so it costs
nothing; with no keys configured there is no authentication layer at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial

from opentelemetry.metrics import Meter

from server.config import Settings, parse_rate
from server.http.auth import ApiKeyAuth, KeySource
from server.http.chain import Layer
from server.http.ratelimit import RateLimit, RateLimiter


class AccessLayers:
    """Built from the settings when the app is created; bound and closed by the lifespan."""

    def __init__(self, settings: Settings) -> None:
        security = settings.security
        self.keys = KeySource(security) if security.authenticated else None
        self.limiter = _rate_limiter(settings)
        layers: list[Layer] = []
        if self.keys is not None:
            layers.append(partial(ApiKeyAuth, keys=self.keys))
        if self.limiter is not None:
            layers.append(partial(RateLimit, limiter=self.limiter))
        self.layers: tuple[Layer, ...] = tuple(layers)

    def bind(self, meter: Meter | None) -> None:
        if self.limiter is not None and meter is not None:
            self.limiter.bind(meter)

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.close()
        if self.limiter is not None:
            await self.limiter.close()


def forwarded_headers(settings: Settings, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether uvicorn should take the client's address from ``X-Forwarded-For``.

    Only the rate limiter reads the client's address; without one, uvicorn's proxy
    headers layer would cost every request (0.6 us, measured) for nothing, unless a
    proxy is named in ``FORWARDED_ALLOW_IPS``.
    """
    return settings.security.rate_limited or "FORWARDED_ALLOW_IPS" in environ


def _rate_limiter(settings: Settings) -> RateLimiter | None:
    """A limiter when any rate may apply: the default, a key's own, or a keys file's."""
    security = settings.security
    if not security.rate_limited:
        return None
    default = parse_rate(security.rate_limit) if security.rate_limit is not None else None
    return RateLimiter(default, settings.redis)
