"""Offline scoring benchmark: ``sluice batch`` rows/s next to the runtime's own predict.

    python -m loadtest.benchmarks.batch_bench [--model-repository models] [--model fraud]

It writes Parquet files of the model's features (its ``holdout.parquet``
resampled, or random values when there is none), measures the in-process floor
(the runtime's ``predict`` on the same float32 rows, already in memory, with as
many threads as the engine gets, at the best of a few chunk sizes), then runs
the local engine as a subprocess on each file and reports its rows/s, the share
of the floor, and its peak RSS, which should not grow with the file. Each
figure is the best of ``--repeat`` runs, since a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from loadtest.benchmarks.readme import provenance, write_section
from server.core.repository import ModelRepository
from server.core.runtimes import RUNTIMES
from server.core.signature import TensorSpec

FLOOR_CHUNKS = (8_192, 65_536, 262_144)
ID_COLUMN = "transaction_id"


@dataclass
class EngineRun:
    rows: int
    rows_per_s: float
    wall_s: float
    peak_rss_mb: float
    share_of_floor: float


def make_input(version_dir: Path, spec: TensorSpec, rows: int, path: Path, seed: int) -> None:
    """``rows`` rows of the model's features plus an id column, as Parquet."""
    rng = np.random.default_rng(seed)
    names = list(spec.feature_names)
    holdout = version_dir / "holdout.parquet"
    if holdout.is_file():
        source = pq.read_table(holdout, columns=names)
        table = source.take(pa.array(rng.integers(0, source.num_rows, rows)))
    else:
        print(f"note: {holdout} not found; using random features", file=sys.stderr)
        values = rng.normal(size=(rows, len(names))).astype(np.float32)
        table = pa.table({n: values[:, i] for i, n in enumerate(names)})
    table = table.append_column(ID_COLUMN, pa.array(np.arange(rows, dtype=np.int64)))
    pq.write_table(table, path)


def measure_floor(
    repo: Path, model: str, data: Path, threads: int, repeat: int
) -> dict[int, float]:
    """Rows/s of the runtime's predict on in-memory float32 rows, per chunk size."""
    repository = ModelRepository(repo)
    config = repository.read_config(model)
    version = repository.versions_on_disk(model)[-1]
    source = repository.read_version(model, version, config)
    signature = config.signature()
    runtime = RUNTIMES[source.runtime](source.artifact, signature, config.runtime_options)
    spec = signature.inputs[0]
    table = pq.read_table(data, columns=list(spec.feature_names))
    matrix = np.column_stack([c.to_numpy() for c in table.columns]).astype(spec.numpy_dtype)
    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        for chunk in FLOOR_CHUNKS:
            parts = [matrix[i : i + chunk] for i in range(0, len(matrix), chunk)]
            runtime.predict({spec.name: parts[0]})  # warm-up
            best = float("inf")
            for _ in range(repeat):
                started = time.perf_counter()
                for _ in pool.map(lambda part: runtime.predict({spec.name: part}), parts):
                    pass
                best = min(best, time.perf_counter() - started)
            rates[chunk] = len(matrix) / best
    runtime.close()
    return rates


def run_engine(
    repo: Path, model: str, data: Path, workdir: Path, threads: int, chunk_rows: int | None
) -> tuple[dict[str, Any], float]:
    """One ``sluice batch`` subprocess: its summary and its wall seconds."""
    output, summary = workdir / "scored.parquet", workdir / "summary.json"
    command = [
        sys.executable, "-m", "server", "batch", "--model-repository", str(repo),
        "--model", model, "--input", str(data), "--output", str(output),
        "--keep-columns", ID_COLUMN, "--summary", str(summary), "--no-progress",
        "--log-level", "warning", "--inference-threads", str(threads),
    ]  # fmt: skip
    if chunk_rows:
        command += ["--chunk-rows", str(chunk_rows)]
    started = time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"sluice batch failed with exit code {code}")
    # Peak RSS comes from the run's own summary (VmHWM since exec): a child's
    # ru_maxrss would include this process's memory at fork time.
    doc: dict[str, Any] = orjson.loads(summary.read_bytes())
    output.unlink()
    return doc, wall


def readme_table(
    runs: list[EngineRun], floor: float, best_chunk: int, threads: int, argv: list[str] | None
) -> str:
    lines = [
        "| rows in file | `sluice batch` rows/s | in-process floor rows/s | share of floor "
        "| peak RSS |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.rows:,} | {r.rows_per_s:,.0f} | {floor:,.0f} | {r.share_of_floor:.0%} "
        f"| {r.peak_rss_mb:,.0f} MiB |"
        for r in runs
    ]
    lines += [
        "",
        f"Floor: the runtime's own predict on the same rows in memory, {threads} threads, "
        f"chunks of {best_chunk:,} (the best of {', '.join(f'{c:,}' for c in FLOOR_CHUNKS)}). "
        "Each figure is the best of the runs; peak RSS is the largest.",
        "",
        provenance(argv),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--rows", default="500000,2000000", help="file sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk-rows", type=int, help="engine chunk size (default: its own)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure (best is kept)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--write-readme", action="store_true", help="put the table into README.md's batch section"
    )
    args = parser.parse_args(argv)
    repo, model = args.model_repository, args.model
    repository = ModelRepository(repo)
    versions = repository.versions_on_disk(model)
    if not versions:
        raise SystemExit(f"model '{model}' has no version in {repo}: run `make models` first")
    version_dir = repo / model / str(versions[-1])
    spec = repository.read_config(model).signature().inputs[0]
    sizes = sorted(int(s) for s in args.rows.split(","))

    with tempfile.TemporaryDirectory(prefix="sluice-batch-bench-") as tmp:
        workdir = Path(tmp)
        files = {}
        for rows in sizes:
            files[rows] = workdir / f"{model}-{rows}.parquet"
            make_input(version_dir, spec, rows, files[rows], seed=rows)
        floor_rates = measure_floor(repo, model, files[sizes[-1]], args.threads, args.repeat)
        best_chunk = max(floor_rates, key=lambda c: floor_rates[c])
        floor = floor_rates[best_chunk]
        runs = []
        for rows in sizes:
            results = [
                run_engine(repo, model, files[rows], workdir, args.threads, args.chunk_rows)
                for _ in range(args.repeat)
            ]
            for summary, _ in results:
                assert summary["rows"]["scored"] == rows, summary
            summary, wall = max(results, key=lambda r: float(r[0]["rows_per_second"]))
            rate = float(summary["rows_per_second"])
            rss = max(float(s["peak_rss_mib"] or 0) for s, _ in results)
            runs.append(EngineRun(rows, rate, wall, rss, rate / floor))

    result = {
        "model": model,
        "version": versions[-1],
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "engine_chunk_rows": args.chunk_rows or "default",
        "floor_rows_per_s": {str(k): round(v) for k, v in floor_rates.items()},
        "floor_best_chunk": best_chunk,
        "runs": [asdict(r) for r in runs],
    }
    print(f"\nmodel {model} v{versions[-1]}, {args.threads} inference threads "
          f"on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"in-process floor (runtime predict, best chunk {best_chunk:,}): {floor:,.0f} rows/s")
    print(f"{'rows':>10} {'engine rows/s':>14} {'of floor':>9} {'wall s':>7} {'peak RSS MiB':>13}")
    for r in runs:
        print(f"{r.rows:>10,} {r.rows_per_s:>14,.0f} {r.share_of_floor:>9.0%} "
              f"{r.wall_s:>7.1f} {r.peak_rss_mb:>13,.0f}")  # fmt: skip
    if args.write_readme:
        write_section("batch", readme_table(runs, floor, best_chunk, args.threads, argv))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
