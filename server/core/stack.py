"""Builds the core (repository, thread pool, registry, service) and tears it down in order.

Both edges use it: the HTTP lifespan and the offline batch command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from server.config import Settings
from server.core.registry import ModelRegistry
from server.core.repository import ModelRepository
from server.core.service import InferenceService, Observer


@asynccontextmanager
async def open_service(
    settings: Settings, observers: tuple[Observer, ...] = ()
) -> AsyncIterator[InferenceService]:
    """Load every model of the repository; on exit drain batchers and stop the pool."""
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="sluice-infer")
    registry = ModelRegistry(
        ModelRepository(settings.model_repository), executor, batching_enabled=settings.batching
    )
    try:
        await registry.load_all()
        yield InferenceService(registry, observers)
    finally:
        await registry.close()
        executor.shutdown(wait=True)
