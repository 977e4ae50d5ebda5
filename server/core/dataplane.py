"""The data plane: everything an edge (HTTP, batch, gRPC later) asks of the core.

Protocol-free: requests and answers are the core's own types
(``InferenceRequest``/``InferenceResult``, ``ModelInfo``, ``VersionInfo``, ...),
never a wire format or a dict. Edges decode, call one method here, and
render; none of them reads the registry or the repository.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Sequence
from typing import Any

from server import __version__
from server.core.catalog import (
    IndexEntry,
    ModelInfo,
    Readiness,
    VersionInfo,
    VersionState,
    VersionStatistics,
)
from server.core.monitoring.feedback import FeedbackOutcome, Label
from server.core.monitoring.worker import MonitoringWorker
from server.core.registry import ModelEntry, ModelRegistry, ModelVersion
from server.core.routing import Route, Router
from server.core.runtimes import DEFAULT_PLATFORMS, PLATFORMS
from server.core.service import InferenceRequest, InferenceResult, InferenceService
from server.errors import InvalidInput, ModelNotFound, Unsupported

SERVER_NAME = "sluice"


class RequestIds:
    """Ids for requests that came without one: a random per-process prefix and a counter.

    Unique across restarts and replicas (64 random bits per process) and ten times
    cheaper than ``uuid4`` on the hot path.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


class DataPlane:
    """Infer, describe, check and manage models; the one surface every edge calls."""

    name = SERVER_NAME
    version = __version__

    def __init__(
        self,
        registry: ModelRegistry,
        service: InferenceService,
        *,
        strict_readiness: bool = False,
        repository_control: bool = True,
        monitoring: MonitoringWorker | None = None,
    ) -> None:
        self._registry = registry
        self._router: Router = registry.router
        self._service = service
        self._strict = strict_readiness
        self._control = repository_control
        self._monitoring = monitoring
        self._ids = RequestIds()

    # -- inference ------------------------------------------------------------

    def route(self, model: str, version: int | None = None) -> Route:
        """Where a request for ``model`` goes; fails for unknown or unready models.

        An edge may call this before it reads the request body, and hand the
        route to ``infer`` so that the model is resolved once.
        """
        return self._router.choose(model, version)

    def infer(
        self, request: InferenceRequest, route: Route | None = None
    ) -> Awaitable[InferenceResult]:
        """Answer one request; every answer carries a request id and its version.

        Routing errors raise here, before anything is awaited. A plain function
        handing back the service's coroutine: one coroutine frame less per request.
        """
        if request.id is None:
            # Always answer with an id (as MLServer does) so feedback can name the request.
            request.id = self._ids.next()
        if route is None:
            route = self._router.choose(request.model, request.version)
        return self._service.infer(route, request)

    # -- health and metadata --------------------------------------------------

    def ready(self) -> bool:
        """Whether the server should take traffic (see ``ModelRegistry.is_ready``)."""
        return self._registry.is_ready(strict=self._strict)

    def models(self) -> list[ModelInfo]:
        """Every loaded model, in load order."""
        return [self._info(entry, self._router.shown(entry.name)) for entry in self._entries()]

    def model(self, name: str, version: int | None = None) -> ModelInfo:
        """One model; ``chosen`` is ``version`` when given, else the version that would answer."""
        entry = self._router.entry(name)
        return self._info(entry, self._router.shown(name, version))

    def readiness(self, name: str, version: int | None = None) -> Readiness:
        """Whether ``name`` (at ``version``, else the version that would answer) can serve."""
        entry = self._router.entry(name)
        mv = self._router.shown(name, version)
        if mv is not None and mv.state is VersionState.READY:
            return Readiness(name, True)
        return Readiness(name, False, mv.reason if mv is not None else entry.error or "no versions")

    def statistics(
        self, name: str | None = None, version: int | None = None
    ) -> list[VersionStatistics]:
        """Per-version statistics of one model (one version), or of every model."""
        entries = [self._router.entry(name)] if name else self._entries()
        found = [
            VersionStatistics(entry.name, mv.version, mv.stats)
            for entry in entries
            for mv in entry.versions.values()
            if version is None or mv.version == version
        ]
        if name and version is not None and not found:
            raise ModelNotFound.version(name, version, entries[0].versions)
        return found

    # -- repository -----------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version of every model in the repository, loaded or not."""
        models = self._registry.models
        rows: list[IndexEntry] = []
        for name in sorted(set(self._registry.repository.names()) | set(models)):
            entry = models.get(name)
            if entry is None:
                rows.append(IndexEntry(name, None, VersionState.UNAVAILABLE, "not loaded"))
                continue
            if not entry.versions:
                reason = entry.error or "no versions"
                rows.append(IndexEntry(name, None, VersionState.UNAVAILABLE, reason))
            rows += [
                IndexEntry(name, v, mv.state, mv.reason) for v, mv in sorted(entry.versions.items())
            ]
        if ready_only:
            rows = [r for r in rows if r.state is VersionState.READY]
        return rows

    async def load(self, name: str) -> ModelInfo:
        """Load or reload ``name`` from the repository; ``InvalidInput`` if nothing can serve."""
        self._check_control()
        entry = await self._registry.load(name)
        if not entry.ready_versions():
            reason = entry.error or "; ".join(
                f"version {v.version}: {v.reason}" for v in entry.versions.values()
            )
            raise InvalidInput(f"failed to load '{name}': {reason}")
        return self._info(entry, self._router.shown(name))

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; requests already queued still finish."""
        self._check_control()
        await self._registry.unload(name)

    def _check_control(self) -> None:
        if not self._control:
            raise Unsupported("repository load/unload is disabled (repository_control: false)")

    # -- monitoring -----------------------------------------------------------

    async def drift(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The drift, data-quality and concept-drift report of the version that would answer."""
        worker = self._worker("drift monitoring")
        return await worker.report(self._router.choose(name, version).serving)

    async def feedback(
        self, name: str, version: int | None, labels: Sequence[Label]
    ) -> FeedbackOutcome:
        """Join ground-truth labels to the predictions they name."""
        worker = self._worker("feedback")
        entry = self._router.entry(name)
        if version is not None and version not in entry.versions:
            raise ModelNotFound.version(name, version, entry.versions)
        return await worker.feedback(name, version, labels)

    def _worker(self, what: str) -> MonitoringWorker:
        if self._monitoring is None:
            raise Unsupported(f"{what} is disabled on this server (settings drift / feedback)")
        return self._monitoring

    # -- views ----------------------------------------------------------------

    def _entries(self) -> list[ModelEntry]:
        return list(self._registry.models.values())

    @staticmethod
    def _info(entry: ModelEntry, chosen: ModelVersion | None) -> ModelInfo:
        shown = _version_info(chosen) if chosen is not None else None
        versions = tuple(_version_info(mv) for _, mv in sorted(entry.versions.items()))
        return ModelInfo(
            name=entry.name,
            config=entry.config,
            error=entry.error,
            versions=versions,
            chosen=shown,
            platform=_platform(entry, shown),
        )


def _version_info(mv: ModelVersion) -> VersionInfo:
    source = mv.source
    platform = mv.platform or (PLATFORMS[source.artifact.name] if source else "")
    return VersionInfo(
        model=mv.name,
        version=mv.version,
        state=mv.state,
        reason=mv.reason,
        platform=platform,
        runtime=source.runtime.value if source else "",
        sha256=mv.sha256,
        executors=mv.runtime.executors if mv.runtime is not None else None,
    )


def _platform(entry: ModelEntry, shown: VersionInfo | None) -> str:
    if shown is not None and shown.platform:
        return shown.platform
    if entry.config is not None and entry.config.runtime is not None:
        return DEFAULT_PLATFORMS[entry.config.runtime]
    return "unknown"
