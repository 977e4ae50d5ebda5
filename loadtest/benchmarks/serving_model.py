"""The model under test, in process: its rows, its metadata, and XGBoost's own predict times."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xgboost as xgb

from loadtest import ModelMetadata, TensorMeta
from loadtest.benchmarks.serving_results import InProcess
from loadtest.benchmarks.serving_servers import pin_self
from server.core.repository import ModelRepository

PREDICT_CALLS = 2_000


@dataclass(frozen=True, slots=True)
class ModelData:
    """The model under test and the rows that are sent to it."""

    repository: Path
    name: str
    version: int
    artifact: Path
    meta: ModelMetadata
    rows: pa.Table
    matrix: np.ndarray[Any, np.dtype[np.float32]]

    @classmethod
    def load(cls, repository: Path, name: str) -> ModelData:
        """The highest version built: the one Sluice serves by default, so all compare alike."""
        repo = ModelRepository(repository)
        versions = repo.versions_on_disk(name)
        if not versions:
            raise SystemExit(f"model '{name}' has no version in {repository}: run `make models`")
        chosen = versions[-1]
        config = repo.read_config(name)
        source = repo.read_version(name, chosen, config)
        holdout = repository / name / str(chosen) / "holdout.parquet"
        if not holdout.is_file():
            raise SystemExit(f"{holdout} not found: run `make models`")
        spec = config.signature().inputs[0]
        meta = ModelMetadata(
            name, (TensorMeta(spec.name, spec.datatype.value, spec.shape, spec.feature_names),), ()
        )
        rows = pq.read_table(holdout, columns=list(spec.feature_names))
        matrix = np.column_stack([c.to_numpy() for c in rows.columns]).astype(np.float32)
        return cls(repository, name, chosen, source.artifact, meta, rows, matrix)


def booster(artifact: Path) -> xgb.Booster:
    model = xgb.Booster(model_file=str(artifact))
    model.set_param({"nthread": 1})
    return model


def measure_in_process(data: ModelData, core: int | None) -> InProcess:
    """Median time per call for 1 and 64 rows, on the servers' core: XGBoost's
    ``inplace_predict`` and the compiled trees Sluice builds for small batches."""
    model = booster(data.artifact)
    compiled = _compiled(model)
    previous = os.sched_getaffinity(0)
    pin_self(core)
    try:
        one, many = (_median_call(model.inplace_predict, data.matrix, n) for n in (1, 64))
        c1 = _median_call(compiled, data.matrix, 1) if compiled is not None else None
        c64 = _median_call(compiled, data.matrix, 64) if compiled is not None else None
    finally:
        os.sched_setaffinity(0, previous)
    return InProcess(one, many, PREDICT_CALLS, c1, c64)


def _compiled(model: xgb.Booster) -> Callable[[np.ndarray[Any, Any]], Any] | None:
    """The compiled trees' predict for ``model`` (None when it has no compiled form)."""
    from server.core.runtimes.base import CompileError
    from server.core.runtimes.compiled import CompiledTrees

    try:
        trees = CompiledTrees.convert(model, "x", "y", np.dtype(np.float32))
    except CompileError:
        return None
    return lambda rows: trees.predict({"x": rows})


def _median_call(
    predict: Callable[[np.ndarray[Any, Any]], Any], matrix: np.ndarray[Any, Any], rows: int
) -> float:
    starts = [(i * rows) % (len(matrix) - rows) for i in range(PREDICT_CALLS)]
    for start in starts[:100]:
        predict(matrix[start : start + rows])
    times = []
    for start in starts:
        began = time.perf_counter()
        predict(matrix[start : start + rows])
        times.append(time.perf_counter() - began)
    return statistics.median(times)
