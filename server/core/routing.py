"""Which version answers: the one home of version choice.

Two questions are answered here and nowhere else:

- which version folders a model serves (its ``version_policy``), asked by the
  registry when it loads a model;
- which served version answers a request: an explicit version always wins,
  otherwise the model's primary, today the highest ready version.

The registry tells the router whenever a model's versions change
(``update``), so that choosing costs two dict lookups per request and never
sorts versions. Canary weights, sticky routing keys and shadows extend
``choose`` and ``Route``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from server.core.catalog import VersionState
from server.core.model_config import VersionPolicy
from server.errors import ModelNotFound, ModelNotReady

if TYPE_CHECKING:
    from server.core.registry import ModelEntry, ModelVersion


class Reason(StrEnum):
    """Why a version answers a request (the prediction log records it)."""

    EXPLICIT = "explicit"  # /versions/{v} in the URL
    PRIMARY = "primary"  # the model's primary version


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the version that serves it, and why that one."""

    serving: ModelVersion
    reason: Reason = Reason.PRIMARY


@dataclass(slots=True)
class _Model:
    entry: ModelEntry
    primary: Route | None
    routes: dict[int, Route] = field(default_factory=dict)


class Router:
    """Chooses the version for every request; kept current by the registry."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}

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

    def update(self, entry: ModelEntry) -> None:
        """A model was loaded, reloaded or unloaded: recompute where its requests go."""
        routes = {v: Route(mv, Reason.EXPLICIT) for v, mv in entry.versions.items()}
        ready = [mv for _, mv in sorted(entry.versions.items()) if mv.state is VersionState.READY]
        primary = Route(ready[-1], Reason.PRIMARY) if ready else None
        self._models[entry.name] = _Model(entry, primary, routes)

    def forget(self, name: str) -> None:
        self._models.pop(name, None)

    def entry(self, name: str) -> ModelEntry:
        """The model called ``name``; ``ModelNotFound`` when there is none."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound.model(name)
        return model.entry

    def choose(self, name: str, version: int | None = None) -> Route:
        """The route of one request; raises ``ModelNotFound`` or ``ModelNotReady``."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound.model(name)
        if version is None:
            primary = model.primary
            if primary is not None and primary.serving.state is VersionState.READY:
                return primary
            raise ModelNotReady(f"model '{name}' has no ready version: {model.entry.why()}")
        route = model.routes.get(version)
        if route is None:
            raise ModelNotFound.version(name, version, model.routes)
        mv = route.serving
        if mv.state is not VersionState.READY:
            raise ModelNotReady(f"model '{name}' version {version} is not ready: {mv.reason}")
        return route

    def shown(self, name: str, version: int | None = None) -> ModelVersion | None:
        """The version a metadata request describes.

        The one asked for (``ModelNotFound`` if not served), else the primary,
        else the highest version even when it is not ready, so that a broken
        model still answers metadata with its reason.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound.model(name)
        if version is not None:
            route = model.routes.get(version)
            if route is None:
                raise ModelNotFound.version(name, version, model.routes)
            return route.serving
        if model.primary is not None and model.primary.serving.state is VersionState.READY:
            return model.primary.serving
        versions = model.entry.versions
        return versions[max(versions)] if versions else None
