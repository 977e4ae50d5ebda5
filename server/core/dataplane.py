"""The data plane: everything an edge (HTTP, batch, gRPC later) asks of the core.

Protocol-free: requests and answers are the core's own types
(``InferenceRequest``/``InferenceResult``, ``ModelInfo``, ``VersionInfo``, ...),
never a wire format or a dict. Edges decode, call one method here, and
render; none of them reads the registry or the repository.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from server import __version__
from server.core.catalog import (
    IndexEntry,
    ModelInfo,
    Readiness,
    VersionInfo,
    VersionState,
    VersionStatistics,
)
from server.core.governance import Action, Approval, Governance
from server.core.governance.approvals import card_approval
from server.core.governance.cards import ModelCard
from server.core.registry import ModelEntry, ModelRegistry, ModelVersion
from server.core.routing import Reason, Route, Router
from server.core.runtimes import DEFAULT_PLATFORMS, PLATFORMS
from server.core.service import InferenceRequest, InferenceResult, InferenceService
from server.errors import InvalidInput, ModelNotFound, ServingError, Unsupported

if TYPE_CHECKING:
    # Types only: the worker brings scipy, steering the rollout analysis; a data plane
    # without monitoring or traffic control (batch) never loads them.
    from server.core.monitoring.feedback import FeedbackOutcome, Label
    from server.core.monitoring.worker import MonitoringWorker
    from server.core.steering import Steering, TrafficView

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
        governance: Governance | None = None,
        steering: Steering | None = None,
    ) -> None:
        self._registry = registry
        self._router: Router = registry.router
        self._service = service
        self._strict = strict_readiness
        self._control = repository_control
        self._monitoring = monitoring
        self._governance = governance
        self._steering = steering
        self._watched: set[str] = steering.watched if steering is not None else set()
        self._ids = RequestIds()

    # -- inference ------------------------------------------------------------

    def route(self, model: str, version: int | None = None, key: str | None = None) -> Route:
        """Where a request for ``model`` goes; fails for unknown or unready models.

        ``key`` is the request's routing key (sticky canary routing). An edge
        may call this before it reads the request body, and hand the route to
        ``infer`` so that the model is resolved once.
        """
        return self._router.choose(model, version, key)

    def routing_key_header(self, model: str) -> bytes | None:
        """The lower-case header whose value is a routing key for ``model``; None: not needed."""
        return self._router.key_header(model)

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
        if self._watched and route.reason is not Reason.EXPLICIT and request.model in self._watched:
            return self._watched_infer(route, request)
        return self._service.infer(route, request)

    async def _watched_infer(self, route: Route, request: InferenceRequest) -> InferenceResult:
        """An answer whose figures the rollout compares (a canary or shadows are set)."""
        assert self._steering is not None
        rollout = self._steering.rollout
        started = time.perf_counter()
        try:
            result = await self._service.infer(route, request)
        except ServingError:
            rollout.served(route, False, time.perf_counter() - started, request, None)
            raise
        rollout.served(route, True, time.perf_counter() - started, request, result)
        return result

    # -- traffic --------------------------------------------------------------------------

    def traffic(self, name: str) -> TrafficView:
        """The traffic document of ``name``, where its rollout stands and the live figures."""
        return self._steer().view(name)

    async def set_traffic(
        self, name: str, document: Any, actor: str = "api", reason: str = ""
    ) -> TrafficView:
        """Replace the traffic document whole (``InvalidInput`` names what is wrong)."""
        return await self._steer().put(name, document, actor, reason)

    async def steer(
        self, name: str, action: str, actor: str = "api", reason: str = ""
    ) -> TrafficView:
        """``promote``, ``rollback``, ``pause`` or ``resume`` a model's canary by hand."""
        steering = self._steer()
        self._router.entry(name)
        if action == "promote":
            return await steering.promote(name, actor, reason)
        if action == "rollback":
            return await steering.rollback(name, actor, reason)
        if action in ("pause", "resume"):
            return await steering.pause(name, actor, reason, paused=action == "pause")
        raise InvalidInput(f"unknown traffic action '{action}' (promote, rollback, pause, resume)")

    def _steer(self) -> Steering:
        if self._steering is None:
            raise Unsupported("traffic control is not available in this process")
        return self._steering

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

    async def load(self, name: str, *, actor: str = "api") -> ModelInfo:
        """Load or reload ``name`` from the repository; ``InvalidInput`` if nothing can serve."""
        self._check_control()
        entry = await self._registry.load(name)
        audit = self._governance.audit if self._governance else None
        if audit is not None:
            audit.record_entry(Action.LOAD, entry, actor=actor, reason="load request")
        if entry.reload_error:
            raise InvalidInput(f"failed to reload '{name}': {entry.reload_error}")
        if not entry.ready_versions():
            reason = entry.error or "; ".join(
                f"version {v.version}: {v.reason}" for v in entry.versions.values()
            )
            raise InvalidInput(f"failed to load '{name}': {reason}")
        return self._info(entry, self._router.shown(name))

    async def unload(self, name: str, *, actor: str = "api") -> None:
        """Stop serving ``name``; requests already queued still finish."""
        self._check_control()
        await self._registry.unload(name)
        entry = self._registry.models.get(name)
        audit = self._governance.audit if self._governance else None
        if audit is not None and entry is not None:
            audit.record_entry(Action.UNLOAD, entry, actor=actor, reason="unload request")

    def _check_control(self) -> None:
        if not self._control:
            raise Unsupported("repository load/unload is disabled (repository_control: false)")

    # -- governance -----------------------------------------------------------

    @property
    def approval_required(self) -> bool:
        """Whether a version needs an approval to take primary or canary traffic."""
        return self._governance is not None and self._governance.require_approval

    def approval(self, name: str, version: int) -> Approval | None:
        """How ``name`` version ``version`` was approved (admin call, else card), or None."""
        mv = self._served(name, version)
        card = mv.source.card if mv.source is not None else {}
        if self._governance is None:
            return card_approval(name, version, card)
        return self._governance.approval(name, version, mv.sha256, card)

    def check_approved(self, name: str, version: int) -> None:
        """``InvalidInput`` when approval is required and the version has none."""
        if self.approval_required and self.approval(name, version) is None:
            raise InvalidInput(
                f"model '{name}' version {version} is not approved "
                "(governance.require_approval: approve it first)"
            )

    async def approve(
        self, name: str, version: int, actor: str, reason: str, *, key_id: str = ""
    ) -> Approval:
        """Approve the artifact ``name`` version ``version`` serves; persisted and audited."""
        mv = self._served(name, version)
        if self._governance is None:
            raise Unsupported("approvals are disabled on this data plane")
        figures = {"key_id": key_id} if key_id else None
        return await asyncio.to_thread(
            self._governance.approve, name, version, mv.sha256, actor, reason, figures
        )

    def card(self, name: str, version: int) -> ModelCard:
        """The model card of one served version."""
        mv = self._served(name, version)
        return ModelCard.of(name, version, mv.sha256, mv.source.card if mv.source else {})

    def _served(self, name: str, version: int) -> ModelVersion:
        entry = self._router.entry(name)
        mv = entry.versions.get(version)
        if mv is None:
            raise ModelNotFound.version(name, version, entry.versions)
        return mv

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
