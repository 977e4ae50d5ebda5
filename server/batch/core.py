"""The core a batch run scores with: the serving core, holding only the model it scores.

``open_dataplane`` (the serving composition) loads every model of the
repository; a batch run needs one, and loading the others cost most of its
start-up (each XGBoost version is also converted to compiled trees). This is
the same composition (thread pool, router, registry, service, data plane) with
three offline differences:

- only ``job.model`` is loaded;
- dynamic batching is off, because a file chunk is already a batch;
- under ``executor: auto``, when every full chunk is larger than any
  switch-over the runtime can measure (``hybrid.TIMED_ROWS``), the version is
  loaded with XGBoost alone: ``auto`` would send every full chunk to XGBoost
  anyway, and converting the trees costs ~0.4 s per version. Only the last,
  partial chunk then runs on XGBoost where the server would use the compiled
  trees (equal within ``parity_tolerance``). A pinned executor is honoured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from server.config import Settings
from server.core.dataplane import DataPlane
from server.core.model_config import ModelConfig
from server.core.registry import ModelRegistry
from server.core.repository import ModelRepository
from server.core.routing import Router
from server.core.runtimes import RuntimeKind
from server.core.runtimes.hybrid import TIMED_ROWS, ExecutorMode
from server.core.service import InferenceService


def offline_settings(settings: Settings) -> Settings:
    """The serving settings with dynamic batching off: every chunk is its own batch."""
    return settings.model_copy(update={"batching": False})


class OfflineRepository(ModelRepository):
    """The repository as a batch run of ``chunk_rows``-row chunks should load it."""

    def __init__(self, root: Path, chunk_rows: int) -> None:
        super().__init__(root)
        self._chunk_rows = chunk_rows

    def read_config(self, name: str) -> ModelConfig:
        config = super().read_config(name)
        options = config.runtime_options
        auto = options.get("executor", ExecutorMode.AUTO.value) == ExecutorMode.AUTO.value
        xgboost = config.runtime is RuntimeKind.XGBOOST or (
            config.runtime is None and not any(self.model_path(name).glob("*/model.onnx"))
        )
        if xgboost and auto and self._chunk_rows > 2 * TIMED_ROWS[-1]:
            pinned = {**options, "executor": ExecutorMode.XGBOOST.value}
            return config.model_copy(update={"runtime_options": pinned})
        return config


@asynccontextmanager
async def open_offline_plane(
    settings: Settings, model: str, chunk_rows: int
) -> AsyncIterator[DataPlane]:
    """A data plane with ``model`` loaded (nothing else); drained and released on exit."""
    settings = offline_settings(settings)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="sluice-infer")
    registry = ModelRegistry(
        OfflineRepository(settings.model_repository, chunk_rows),
        executor,
        router=Router(),
        batching_enabled=False,
        threads=settings.inference_threads,
    )
    try:
        await registry.load(model)
        yield DataPlane(registry, InferenceService(), repository_control=False)
    finally:
        await registry.close()
        executor.shutdown(wait=True)
