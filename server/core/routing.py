"""Which version answers: the one home of version choice.

Three questions are answered here and nowhere else:

- which version folders a model serves (its ``version_policy``), asked by the
  registry when it loads a model;
- which served version answers a request: an explicit version always wins;
  otherwise the canary for its weight (by routing key when the request has
  one, else at random), else the primary (the traffic document's, else the
  highest ready version). A version that is not ready or whose circuit
  breaker is open (``server.core.breaker``) is passed over: the canary's
  requests go to the primary, the primary's to its fallback (the document's
  ``fallback``, else the highest other ready version that is neither canary
  nor shadow), and an answer served that way is marked ``fallback``. With
  nothing left, the request fails fast with 503 and ``Retry-After``;
- which versions see a copy of it (shadows) or score it alongside (the
  primary next to a sampled share of the canary's requests).

The registry tells the router whenever a model's versions change
(``update``) and the data plane when its traffic document changes
(``set_traffic``), so that choosing costs a few dict lookups per request and
never sorts versions.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from server.core.catalog import VersionState
from server.core.model_config import VersionPolicy
from server.core.traffic import TrafficDocument
from server.errors import ModelNotFound, ModelNotReady

if TYPE_CHECKING:
    from server.core.registry import ModelEntry, ModelVersion

BUCKETS = 10_000  # routing keys hash into this many buckets: weights to 0.01 %


class Reason(StrEnum):
    """Why a version answers a request (the prediction log records it)."""

    EXPLICIT = "explicit"  # /versions/{v} in the URL
    PRIMARY = "primary"  # the model's primary version
    CANARY = "canary"  # the canary's share of the traffic
    FALLBACK = "fallback"  # the version that should answer cannot: another one did


@dataclass(frozen=True, slots=True)
class Copy:
    """A version that scores a copy of a request off the hot path."""

    version: ModelVersion
    sample: float  # share of the route's requests copied


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the version that serves it, why, and who else scores it."""

    serving: ModelVersion
    reason: Reason = Reason.PRIMARY
    copies: tuple[Copy, ...] = ()  # shadows (of the primary), the primary (of the canary)


@dataclass(slots=True)
class _Model:
    entry: ModelEntry
    primary: Route | None
    routes: dict[int, Route] = field(default_factory=dict)
    canary: Route | None = None
    weight: float = 0.0  # percent
    rescue: Route | None = None  # the primary, answering for a canary that cannot
    fallbacks: tuple[Route, ...] = ()  # answering for the primary, in order of preference
    key_header: bytes | None = None  # lower-case header name, when a canary is set


def _usable(mv: ModelVersion) -> bool:
    """Ready, and its breaker lets this request through (a probe, when half-open)."""
    if mv.state is not VersionState.READY:
        return False
    breaker = mv.breaker
    return breaker is None or breaker.closed or breaker.admit()


def bucket(key: str) -> int:
    """The stable bucket of a routing key: the same key, the same bucket, on every replica."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % BUCKETS


class Router:
    """Chooses the version for every request; kept current by the registry and the data plane."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}
        self._traffic: dict[str, TrafficDocument] = {}
        self._random = random.random

    @staticmethod
    def select(policy: VersionPolicy, available: list[int]) -> list[int]:
        """The version folders a model serves under its policy, ascending."""
        ordered = sorted(available)
        if policy.all:
            return ordered
        if policy.specific is not None:
            wanted = set(policy.specific)
            return [v for v in ordered if v in wanted]
        return ordered[-(policy.latest or 1) :]

    def traffic(self, name: str) -> TrafficDocument:
        """The traffic document in force for ``name`` (model.yaml's until one is set)."""
        return self._document(self.entry(name))

    def _document(self, entry: ModelEntry) -> TrafficDocument:
        found = self._traffic.get(entry.name)
        if found is None and entry.config is not None and entry.config.traffic is not None:
            found = entry.config.traffic
        return found if found is not None else TrafficDocument()

    def set_traffic(self, name: str, document: TrafficDocument) -> None:
        """Apply a (validated) traffic document to ``name`` at once."""
        self._traffic[name] = document
        self.update(self.entry(name))

    def update(self, entry: ModelEntry) -> None:
        """A model was loaded, reloaded or unloaded: recompute where its requests go."""
        doc = self._document(entry)
        versions = entry.versions
        ready = [mv for _, mv in sorted(versions.items()) if mv.state is VersionState.READY]
        highest = ready[-1] if ready else None
        chosen = versions.get(int(doc.primary)) if doc.primary else highest
        shadows = tuple(
            Copy(versions[int(s.version)], s.sample)
            for s in doc.shadows
            if int(s.version) in versions and s.sample > 0
        )
        model = _Model(entry, Route(chosen, Reason.PRIMARY, shadows) if chosen else None)
        model.routes = {v: Route(mv, Reason.EXPLICIT) for v, mv in versions.items()}
        canary = doc.canary
        canary_mv = versions.get(int(canary.version)) if canary is not None else None
        if chosen is not None:
            model.rescue = Route(chosen, Reason.FALLBACK, shadows)
        model.fallbacks = tuple(
            Route(mv, Reason.FALLBACK, shadows)
            for mv in _fallbacks(doc, versions, ready, chosen, canary_mv)
        )
        if canary is not None and canary_mv is not None and canary.weight > 0 and chosen:
            pair = (Copy(chosen, doc.analysis.pair_sample),) if doc.analysis.pair_sample else ()
            model.canary = Route(canary_mv, Reason.CANARY, pair)
            model.weight = canary.weight
            model.key_header = doc.routing_key_header.lower().encode("latin-1")
        self._models[entry.name] = model

    def forget(self, name: str) -> None:
        self._models.pop(name, None)
        self._traffic.pop(name, None)

    def entry(self, name: str) -> ModelEntry:
        """The model called ``name``; ``ModelNotFound`` when there is none."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound.model(name)
        return model.entry

    def key_header(self, name: str) -> bytes | None:
        """The header whose value routes a request of ``name`` stickily; None: no canary."""
        model = self._models.get(name)
        return model.key_header if model is not None else None

    def choose(self, name: str, version: int | None = None, key: str | None = None) -> Route:
        """The route of one request; raises ``ModelNotFound`` or ``ModelNotReady``."""
        model = self._model(name)
        if version is not None:
            route = self._explicit(model, name, version)
            mv = route.serving
            if mv.state is not VersionState.READY:
                raise ModelNotReady(f"model '{name}' version {version} is not ready: {mv.reason}")
            breaker = mv.breaker
            if breaker is not None and not breaker.closed and not breaker.admit():
                raise ModelNotReady(
                    f"model '{name}' version {version} is failing (circuit breaker open: "
                    f"{breaker.reason})",
                    retry_after_s=breaker.retry_after_s(),
                )
            return route
        canary = model.canary
        diverted = False
        if canary is not None and canary.serving.state is VersionState.READY:
            if key is not None:
                taken = bucket(key) < model.weight * (BUCKETS / 100)
            else:
                taken = self._random() * 100 < model.weight
            if taken:
                if _usable(canary.serving):
                    return canary
                diverted = True
        primary = model.primary
        if primary is not None and _usable(primary.serving):
            return model.rescue if diverted and model.rescue is not None else primary
        for route in model.fallbacks:
            if _usable(route.serving):
                return route
        raise _no_version(name, model)

    def primary(self, name: str) -> Route | None:
        """The primary route of ``name`` (None while no version is ready)."""
        return self._model(name).primary

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound.model(name)
        return model

    @staticmethod
    def _explicit(model: _Model, name: str, version: int) -> Route:
        route = model.routes.get(version)
        if route is None:
            raise ModelNotFound.version(name, version, model.routes)
        return route

    def shown(self, name: str, version: int | None = None) -> ModelVersion | None:
        """The version a metadata request describes.

        The one asked for (``ModelNotFound`` if not served), else the primary,
        else the highest version even when it is not ready, so that a broken
        model still answers metadata with its reason.
        """
        model = self._model(name)
        if version is not None:
            return self._explicit(model, name, version).serving
        for route in (model.primary, *model.fallbacks):
            if route is not None and route.serving.state is VersionState.READY:
                return route.serving
        versions = model.entry.versions
        return versions[max(versions)] if versions else None


def _fallbacks(
    doc: TrafficDocument,
    versions: dict[int, ModelVersion],
    ready: list[ModelVersion],
    primary: ModelVersion | None,
    canary: ModelVersion | None,
) -> list[ModelVersion]:
    """Who answers for the primary, best first: the document's fallback, the highest other
    ready version that is neither canary nor shadow, and last the canary itself."""
    shadows = {int(s.version) for s in doc.shadows}
    named = versions.get(int(doc.fallback)) if doc.fallback else None
    order = [named] if named is not None and named is not primary else []
    order += [
        mv
        for mv in reversed(ready)
        if mv is not primary and mv is not canary and mv is not named and mv.version not in shadows
    ]
    if canary is not None and canary is not primary:
        order.append(canary)
    return order


def _no_version(name: str, model: _Model) -> ModelNotReady:
    """Every version that could answer is not ready or has its breaker open."""
    versions = model.entry.versions.values()
    broken = [mv for mv in versions if mv.breaker is not None and not mv.breaker.closed]
    if broken and all(mv.state is not VersionState.READY or mv in broken for mv in versions):
        wait = min(mv.breaker.retry_after_s() for mv in broken if mv.breaker is not None)
        reasons = "; ".join(
            f"version {mv.version}: {mv.breaker.reason}" for mv in broken if mv.breaker
        )
        return ModelNotReady(
            f"model '{name}' has no working version (circuit breaker open: {reasons})",
            retry_after_s=max(1.0, wait),
        )
    return ModelNotReady(f"model '{name}' has no ready version: {model.entry.why()}")
