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

Start-up imports only what the job uses: the runtime of the scored model, and
XGBoost without its scikit-learn wrapper (``import_runtimes``).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from server.config import Settings
from server.core.dataplane import DataPlane
from server.core.model_config import ModelConfig
from server.core.registry import ModelRegistry
from server.core.repository import ModelRepository, RepositoryError
from server.core.routing import Router
from server.core.runtimes import ARTIFACTS, RUNTIMES, RuntimeKind
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

    def runtime_kinds(self, name: str) -> set[RuntimeKind]:
        """The runtimes ``name``'s versions on disk need (none known: the registry will say why)."""
        try:
            config = self.read_config(name)
            if config.runtime is not None:
                return {config.runtime}
            folders = [self.model_path(name) / str(v) for v in self.versions_on_disk(name)]
        except RepositoryError:
            return set()
        return {ARTIFACTS[p.name] for f in folders for p in f.iterdir() if p.name in ARTIFACTS}


@contextmanager
def _hidden(module: str) -> Iterator[None]:
    """Inside the block ``import module`` fails as if it were not installed.

    A None entry in ``sys.modules`` makes the import raise ImportError; it is
    removed on exit, so the module is importable again. A module already
    imported is left alone.
    """
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(module, ...) is None:
            del sys.modules[module]


def import_runtimes(kinds: set[RuntimeKind]) -> None:
    """Import the runtimes of ``kinds`` now, and nothing the job does not use.

    xgboost imports its scikit-learn wrapper whenever scikit-learn is
    installed (it is: onnxmltools depends on skl2onnx, which depends on it),
    and scikit-learn imports scipy.stats and, where installed, pandas: 0.4 to
    0.9 s, most of a batch run's start-up. A run scores Boosters only, so the
    first import of xgboost is made with scikit-learn hidden; xgboost then
    defines its estimator classes without scikit-learn's base classes, and
    scikit-learn itself stays importable. xgboost already imported (with or
    without it) is left as it is.
    """
    if RuntimeKind.XGBOOST in kinds and "xgboost" not in sys.modules:
        with _hidden("sklearn"):
            importlib.import_module("xgboost")
    for kind in sorted(kinds):
        RUNTIMES[kind].resolve()


@asynccontextmanager
async def open_offline_plane(
    settings: Settings, model: str, chunk_rows: int
) -> AsyncIterator[DataPlane]:
    """A data plane with ``model`` loaded (nothing else); drained and released on exit."""
    settings = offline_settings(settings)
    repository = OfflineRepository(settings.model_repository, chunk_rows)
    await asyncio.to_thread(import_runtimes, repository.runtime_kinds(model))
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="sluice-infer")
    registry = ModelRegistry(
        repository,
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
