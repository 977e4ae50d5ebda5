"""µs per predict call for every executor of the example models, at batch 1, 8, 64 and 512.

    python -m loadtest.benchmarks.executor_bench [--model-repository models] [--cpu 1]
        [--calls 2000] [--write-readme]

Contenders, each loaded as the server loads it (``RUNTIMES`` with the model's
``runtime_options``, the executor pinned):

- fraud (XGBoost): ``xgboost`` (Sluice's dense C-API path), XGBoost's public
  ``inplace_predict`` (for reference), ``compiled`` (ONNX TreeEnsemble in ONNX
  Runtime), ``auto`` (the hybrid as served), and Treelite/TL2cgen's compiled C
  when ``tl2cgen`` is installed (it is not a dependency: it needs a C compiler
  and ~7 s of gcc per model at load).
- churn (ONNX): ``onnxruntime``, the only executor.

One thread, the process pinned to one CPU, contenders alternating call by
call so that a busy machine slows them alike; each figure is a median. A
second table times the hand-off to a thread against a call on the event loop
for one row on the compiled trees, with the loop's longest stall.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from loadtest.benchmarks.readme import provenance, write_section
from server.core.repository import ModelRepository
from server.core.runtimes import RUNTIMES, Runtime

SIZES = (1, 8, 64, 512)
Predict = Callable[[np.ndarray], object]


def load(repo: Path, model: str, version: int, **options: Any) -> Runtime:
    repository = ModelRepository(repo)
    config = repository.read_config(model)
    source = repository.read_version(model, version, config)
    merged = {**config.runtime_options, **options}
    return RUNTIMES[source.runtime](source.artifact, config.signature(), merged)


def rows_of(repo: Path, model: str, version: int, n: int) -> np.ndarray:
    config = ModelRepository(repo).read_config(model)
    names = list(config.inputs[0].feature_names)
    table = pq.read_table(repo / model / str(version) / "holdout.parquet", columns=names)
    x = np.column_stack([table.column(c).to_numpy() for c in names]).astype(np.float32)
    return np.ascontiguousarray(np.resize(x, (n, x.shape[1])))


def contenders(repo: Path, model: str, version: int) -> tuple[dict[str, Predict], Runtime]:
    """Every executor of one version, as a function of the rows; and the runtime as served."""
    served = load(repo, model, version)
    if ModelRepository(repo).read_config(model).runtime != "xgboost":
        return {"onnxruntime": lambda x: served.predict({"features": x})}, served
    found: dict[str, Predict] = {}
    for mode in ("xgboost", "compiled"):
        found[mode] = _predictor(load(repo, model, version, executor=mode))
    found["auto"] = lambda x: served.predict({"features": x})
    import xgboost as xgb

    booster = xgb.Booster(model_file=str(repo / model / str(version) / "model.ubj"))
    booster.set_param({"nthread": 1})
    found["xgboost inplace_predict"] = lambda x: booster.inplace_predict(x)
    treelite = _tl2cgen(booster)
    if treelite is not None:
        found["tl2cgen (Treelite C)"] = treelite
    return found, served


def _predictor(runtime: Runtime) -> Predict:
    return lambda x: runtime.predict({"features": x})


def _tl2cgen(booster: Any) -> Predict | None:
    try:
        import tl2cgen
        import treelite
    except ImportError:
        return None
    library = Path(tempfile.mkdtemp(prefix="sluice-tl2cgen-")) / "model.so"
    tl2cgen.export_lib(
        treelite.frontend.from_xgboost(booster),
        toolchain="gcc",
        libpath=str(library),
        params={"parallel_comp": 8},
        nthread=1,
    )
    predictor = tl2cgen.Predictor(str(library), nthread=1)
    return lambda x: predictor.predict(tl2cgen.DMatrix(x))


def time_calls(found: dict[str, Predict], x: np.ndarray, calls: int) -> dict[str, float]:
    """Median µs per call of each contender on ``x``, calls alternating."""
    samples: dict[str, list[int]] = {name: [] for name in found}
    for predict in found.values():
        predict(x)
    order = list(found.items())
    shuffle = np.random.default_rng(0)
    for _ in range(calls):
        # A new order each round: a call right after another executor's runs on the caches
        # that one evicted, and a fixed (or rotated) order charges it to the same neighbour.
        for k in shuffle.permutation(len(order)):
            name, predict = order[k]
            started = time.perf_counter_ns()
            predict(x)
            samples[name].append(time.perf_counter_ns() - started)
    return {name: float(np.median(ns)) / 1000 for name, ns in samples.items()}


def hand_off(predict: Predict, x: np.ndarray, calls: int) -> dict[str, float]:
    """One-row call on the event loop against through a one-thread pool (uvloop)."""
    import uvloop

    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        inline: list[int] = []
        pooled: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            for _ in range(calls):
                started = time.perf_counter_ns()
                predict(x)
                inline.append(time.perf_counter_ns() - started)
                started = time.perf_counter_ns()
                await loop.run_in_executor(pool, predict, x)
                pooled.append(time.perf_counter_ns() - started)
        a, b = np.asarray(inline) / 1000, np.asarray(pooled) / 1000
        return {
            "inline_p50": float(np.median(a)),
            "inline_p999": float(np.percentile(a, 99.9)),
            "inline_max": float(a.max()),
            "pool_p50": float(np.median(b)),
            "pool_p99": float(np.percentile(b, 99)),
        }

    return uvloop.run(run())


def _us(value: float) -> str:
    return f"{value:,.0f} µs" if value >= 100 else f"{value:.1f} µs"


def render(
    results: dict[str, dict[str, dict[int, float]]],
    switches: dict[str, str],
    handoff: dict[str, dict[str, float]],
    cpu: str,
) -> str:
    head = "| model | executor | " + " | ".join(f"batch {n}" for n in SIZES) + " |"
    lines = [head, "| --- | --- |" + " ---: |" * len(SIZES)]
    for label, by_executor in results.items():
        for executor, by_size in by_executor.items():
            best = {n: min(r[n] for r in by_executor.values()) for n in SIZES}
            cells = [
                f"**{_us(by_size[n])}**" if by_size[n] == best[n] else _us(by_size[n])
                for n in SIZES
            ]
            lines.append(f"| {label} | {executor} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Median µs per call (bold: fastest at that batch size), one thread, the process "
        f"pinned to CPU {cpu}, contenders alternating call by call (in a new random order "
        "each round). `auto` is the hybrid as served; it chose "
        + "; ".join(f"{k}: {v}" for k, v in switches.items())
        + ".",
        "",
        "| one row, compiled trees | on the event loop | through a thread | "
        "longest loop stall (p99.9 / max) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, h in handoff.items():
        lines.append(
            f"| {label} | {_us(h['inline_p50'])} | {_us(h['pool_p50'])} "
            f"(p99 {_us(h['pool_p99'])}) | {_us(h['inline_p999'])} / {_us(h['inline_max'])} |"
        )
    lines += ["", provenance() + " The machine was shared with other work."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--calls", type=int, default=2000, help="calls per contender and size")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    repo: Path = args.model_repository
    results: dict[str, dict[str, dict[int, float]]] = {}
    switches: dict[str, str] = {}
    handoff: dict[str, dict[str, float]] = {}
    for model in ("fraud", "churn"):
        for version in ModelRepository(repo).versions_on_disk(model):
            label = f"{model} v{version}"
            found, served = contenders(repo, model, version)
            results[label] = {name: {} for name in found}
            for n in SIZES:
                x = rows_of(repo, model, version, n)
                calls = args.calls if n <= 64 else max(50, args.calls // 10)
                for name, us in time_calls(found, x, calls).items():
                    results[label][name][n] = us
                print(label, n, {k: round(v[n], 1) for k, v in results[label].items()})
            if "compiled" in found:
                switches[label] = served.executors.summary()
                handoff[label] = hand_off(found["compiled"], rows_of(repo, model, version, 1), 5000)
                print(label, switches[label], handoff[label])
    table = render(results, switches, handoff, str(args.cpu))
    print(table)
    if args.write_readme:
        write_section("executors", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
