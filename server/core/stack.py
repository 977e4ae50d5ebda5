"""Builds the core (repository, thread pool, router, registry, service, data plane)
and tears it down in order.

Every edge uses it: the HTTP lifespan, the offline batch command and
``sluice models``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from server.config import Settings
from server.core.dataplane import DataPlane
from server.core.governance import Action, Governance
from server.core.monitoring.hub import Monitoring
from server.core.registry import ModelRegistry
from server.core.repository import ModelRepository
from server.core.routing import Router
from server.core.service import FailureObserver, InferenceService, Observer
from server.core.steering import Steering, TrafficStates
from server.core.store import SharedStore
from server.core.watcher import RepositoryWatcher


@asynccontextmanager
async def open_dataplane(
    settings: Settings,
    observers: tuple[Observer, ...] = (),
    monitoring: Monitoring | None = None,
    *,
    governed: bool = False,
) -> AsyncIterator[DataPlane]:
    """Load every model of the repository; on exit drain batchers and stop the pool.

    ``monitoring`` (metrics, drift, feedback, traces) closes after the last batch.
    ``governed`` (a server) writes the audit log, from the start-up loads to the
    shutdown, and the prediction log when one is configured; without it
    (``sluice models``, batch) approvals are still read.
    """
    governance = Governance.from_settings(settings, writers=governed)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="sluice-infer")
    store = SharedStore(settings.redis) if settings.redis.url else None
    registry = ModelRegistry(
        ModelRepository(settings.model_repository),
        executor,
        router=Router(),
        batching_enabled=settings.batching,
        executions=monitoring.executions if monitoring else (),
        tracer=monitoring.tracer if monitoring else None,
        threads=settings.inference_threads,
        shared_cache=store if settings.cache.backend == "redis" else None,
    )
    registry.on_breaker(
        lambda event: governance.audit_hook(
            "system",
            Action.BREAKER,
            event.model,
            event.version,
            f"circuit breaker {event.state.value}: {event.reason}",
            event.figures,
        )
    )
    try:
        await registry.load_all()
        failures: tuple[FailureObserver, ...] = ()
        if governance.audit is not None:
            for entry in registry.models.values():
                governance.audit.record_entry(
                    Action.LOAD, entry, actor="system", reason="server start"
                )
        if governance.predictions is not None:
            observers = (*observers, governance.predictions)
            failures = (governance.predictions,)
        if monitoring is not None:
            if store is not None and monitoring.worker is not None:
                monitoring.worker.share(store, registry.version)
            monitoring.start(registry, store)
            observers = (*observers, *monitoring.observers)
        async with _control_loops(settings, registry, store, governance) as steering:
            yield DataPlane(
                registry,
                InferenceService(observers, failures),
                strict_readiness=settings.strict_readiness,
                repository_control=settings.repository_control,
                monitoring=monitoring.worker if monitoring else None,
                governance=governance,
                steering=steering,
            )
    finally:
        if governance.audit is not None:
            for entry in registry.models.values():
                if not entry.unloaded:
                    governance.audit.record_entry(
                        Action.UNLOAD, entry, actor="system", reason="server shutdown"
                    )
        await registry.close()
        governance.close()
        if monitoring is not None:
            await monitoring.close()
        if store is not None:
            await store.close()
        executor.shutdown(wait=True)


@asynccontextmanager
async def _control_loops(
    settings: Settings,
    registry: ModelRegistry,
    store: SharedStore | None,
    governance: Governance,
) -> AsyncIterator[Steering]:
    """The traffic steering (analysis, documents from other processes) and, when
    ``repository_poll_s`` is set, the repository watcher; both stopped on exit."""
    steering = Steering(
        registry,
        TrafficStates(settings.model_repository, store),
        audit=governance.audit_hook,
        approved=governance.approval_check(registry) if governance.require_approval else None,
    )
    await steering.start()
    watcher = None
    if settings.repository_poll_s is not None:
        watcher = RepositoryWatcher(registry, settings.repository_poll_s, governance.audit)
        await watcher.start()
    try:
        yield steering
    finally:
        if watcher is not None:
            await watcher.close()
        await steering.close()
