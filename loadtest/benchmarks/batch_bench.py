"""Offline scoring benchmark: ``sluice batch`` against a hand-written script, and its rows/s.

    python -m loadtest.benchmarks.batch_bench [--model-repository models] [--model fraud]

It writes Parquet files of the model's features (its ``holdout.parquet``
resampled, or random values when there is none), then:

- the contest, on ``--contest-rows`` rows (1 M): ``sluice batch`` and the
  hand-written script (``batch_script.py``: pyarrow and XGBoost alone, chunk by
  chunk in sequence, ``--threads`` XGBoost threads) each run ``--rounds``
  times as subprocesses, alternating which goes first. Both are timed the same
  way: wall-clock from just before the process is spawned to its exit, start-up
  included. Sluice's time to first row is from the same spawn instant to the
  moment its first chunk of scored rows was written and checkpointed in the
  output (``first_rows_at`` in its summary, a Unix time read in the child):
  interpreter start, imports, settings, loading the model, opening the input
  and reading, converting, scoring and writing the first chunk all count. Both
  outputs are checked equal, value for value, after an untimed warm-up run of
  each. Figures are medians, and the ratio is the median of the rounds'.
- throughput: the in-process floor (the runtime's ``predict`` on the same
  float32 rows, already in memory, with as many threads as the engine gets, at
  the best of a few chunk sizes), then the local engine as a subprocess on each
  ``--rows`` file: its rows/s, the share of the floor, and its peak RSS, which
  should not grow with the file. Each figure is the best of ``--repeat`` runs,
  since a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

import server
from loadtest.benchmarks.readme import provenance, write_section
from server.core.repository import ModelRepository
from server.core.runtimes import RUNTIMES
from server.core.signature import TensorSpec

FLOOR_CHUNKS = (8_192, 65_536, 262_144)
ID_COLUMN = "transaction_id"
SCRIPT = Path(__file__).with_name("batch_script.py")


@dataclass
class EngineRun:
    rows: int
    rows_per_s: float
    wall_s: float
    peak_rss_mb: float
    share_of_floor: float


@dataclass
class Contest:
    """``sluice batch`` and the hand-written script on the same file, round after round."""

    rows: int
    rounds: int
    sluice_wall_s: list[float] = field(default_factory=list)
    script_wall_s: list[float] = field(default_factory=list)
    sluice_first_row_s: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average, each round

    @property
    def ratios(self) -> list[float]:
        """Sluice's wall-clock over the script's, per round."""
        return [a / b for a, b in zip(self.sluice_wall_s, self.script_wall_s, strict=True)]

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rounds": self.rounds,
            "sluice_wall_s_median": round(statistics.median(self.sluice_wall_s), 3),
            "script_wall_s_median": round(statistics.median(self.script_wall_s), 3),
            "ratio_median": round(statistics.median(self.ratios), 3),
            "sluice_first_row_s_median": round(statistics.median(self.sluice_first_row_s), 3),
            "sluice_first_row_s_max": round(max(self.sluice_first_row_s), 3),
            "sluice_wall_s_min": round(min(self.sluice_wall_s), 3),
            "script_wall_s_min": round(min(self.script_wall_s), 3),
            "sluice_first_row_s_min": round(min(self.sluice_first_row_s), 3),
            "load": self.load,
            "sluice_wall_s": [round(x, 3) for x in self.sluice_wall_s],
            "script_wall_s": [round(x, 3) for x in self.script_wall_s],
            "sluice_first_row_s": [round(x, 3) for x in self.sluice_first_row_s],
        }


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


def timed(command: list[str], what: str) -> tuple[float, float]:
    """Run ``command``; returns the Unix time just before the spawn and the wall seconds."""
    spawned_at = time.time()
    started = time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{what} failed with exit code {code}")
    return spawned_at, wall


def run_engine(
    repo: Path,
    model: str,
    data: Path,
    workdir: Path,
    threads: int,
    chunk_rows: int | None,
    keep_output: bool = False,
) -> tuple[dict[str, Any], float, float]:
    """One ``sluice batch`` subprocess: its summary, wall seconds and time to first row."""
    output, summary = workdir / "scored.parquet", workdir / "summary.json"
    command = [
        sys.executable, "-m", "server", "batch", "--model-repository", str(repo),
        "--model", model, "--input", str(data), "--output", str(output),
        "--keep-columns", ID_COLUMN, "--summary", str(summary), "--no-progress",
        "--log-level", "warning", "--inference-threads", str(threads),
    ]  # fmt: skip
    if chunk_rows:
        command += ["--chunk-rows", str(chunk_rows)]
    spawned_at, wall = timed(command, "sluice batch")
    # Peak RSS comes from the run's own summary (VmHWM since exec): a child's
    # ru_maxrss would include this process's memory at fork time.
    doc: dict[str, Any] = orjson.loads(summary.read_bytes())
    if not keep_output:
        output.unlink()
    return doc, wall, float(doc["first_rows_at"]) - spawned_at


def run_script(
    booster: Path, data: Path, workdir: Path, threads: int, version: int, keep_output: bool = False
) -> float:
    """One hand-written script subprocess (the same Python, by path): its wall seconds."""
    output = workdir / "script.parquet"
    command = [
        sys.executable, str(SCRIPT), str(booster), str(data), str(output), "--keep", ID_COLUMN,
        "--threads", str(threads), "--model-version", str(version),
    ]  # fmt: skip
    _, wall = timed(command, "the hand-written script")
    if not keep_output:
        output.unlink()
    return wall


def same_scores(workdir: Path) -> None:
    """Both contenders wrote the same rows, in the same order, with the same scores."""
    sluice, script = (pq.read_table(workdir / n) for n in ("scored.parquet", "script.parquet"))
    if not sluice.equals(script.select(sluice.column_names)):
        raise SystemExit("sluice batch and the hand-written script disagree on the scores")
    for name in ("scored.parquet", "script.parquet"):
        (workdir / name).unlink()


def load_average() -> float:
    """The machine's 1-minute load average (the benchmark shares it with other work)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_contest(
    repo: Path, model: str, version_dir: Path, data: Path, workdir: Path, threads: int, rounds: int
) -> Contest:
    """Both contenders ``rounds`` times, alternating which goes first, after a warm-up.

    The warm-up (one untimed run of each) puts the input, the interpreter and
    the libraries of both in the page cache, and its outputs are compared.
    """
    booster = next(p for p in version_dir.iterdir() if p.name in ("model.ubj", "model.json"))
    version = int(version_dir.name)
    # Sluice's modules byte-compiled, as pip leaves an installed package: this checkout is an
    # editable install, and where PYTHONDONTWRITEBYTECODE is set (containers often set it)
    # every start would compile them again from source.
    compileall.compile_dir(Path(server.__file__).parent, quiet=1)
    contest = Contest(pq.ParquetFile(data).metadata.num_rows, rounds)
    run_engine(repo, model, data, workdir, threads, None, keep_output=True)
    run_script(booster, data, workdir, threads, version, keep_output=True)
    same_scores(workdir)
    for i in range(rounds):
        contest.load.append(load_average())
        order = ("sluice", "script") if i % 2 == 0 else ("script", "sluice")
        for contender in order:
            if contender == "sluice":
                doc, wall, first = run_engine(repo, model, data, workdir, threads, None)
                assert doc["rows"]["scored"] == contest.rows, doc
                contest.sluice_wall_s.append(wall)
                contest.sluice_first_row_s.append(first)
            else:
                contest.script_wall_s.append(run_script(booster, data, workdir, threads, version))
        print(
            f"round {i + 1}/{rounds}: sluice {contest.sluice_wall_s[-1]:.2f} s "
            f"(first row {contest.sluice_first_row_s[-1]:.2f} s), "
            f"script {contest.script_wall_s[-1]:.2f} s",
            file=sys.stderr,
        )
    return contest


def contest_table(contest: Contest, threads: int) -> list[str]:
    c = contest.summary()
    return [
        f"On {contest.rows:,} rows, {threads} threads, {contest.rounds} alternating rounds; "
        "median (fastest):",
        "",
        "| contender | wall-clock, spawn to exit | time to first scored row |",
        "| --- | ---: | ---: |",
        f"| `sluice batch` | {c['sluice_wall_s_median']:.2f} s ({c['sluice_wall_s_min']:.2f} s) "
        f"| {c['sluice_first_row_s_median']:.2f} s ({c['sluice_first_row_s_min']:.2f} s) |",
        f"| hand-written script (pyarrow + XGBoost, in sequence) "
        f"| {c['script_wall_s_median']:.2f} s ({c['script_wall_s_min']:.2f} s) | |",
        f"| Sluice / script, per round | {c['ratio_median']:.2f} "
        f"({min(contest.ratios):.2f}-{max(contest.ratios):.2f}) | |",
        "",
        f"Load average during the rounds {min(contest.load):.1f}-{max(contest.load):.1f} "
        f"on {os.cpu_count()} CPUs (other work on the machine).",
        "",
    ]


def readme_table(
    runs: list[EngineRun],
    floor: float,
    best_chunk: int,
    threads: int,
    argv: list[str] | None,
    contest: Contest | None,
) -> str:
    lines = contest_table(contest, threads) if contest is not None else []
    lines += [
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
    parser.add_argument(
        "--contest-rows", type=int, default=1_000_000, help="rows of the contest file (0: none)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="contest rounds")
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
    sizes = sorted(int(s) for s in args.rows.split(",") if s)

    with tempfile.TemporaryDirectory(prefix="sluice-batch-bench-") as tmp:
        workdir = Path(tmp)
        contest = None
        if args.contest_rows:
            data = workdir / f"{model}-contest-{args.contest_rows}.parquet"
            make_input(version_dir, spec, args.contest_rows, data, seed=args.contest_rows)
            contest = run_contest(
                repo, model, version_dir, data, workdir, args.threads, args.rounds
            )
            data.unlink()
        files = {}
        for rows in sizes:
            files[rows] = workdir / f"{model}-{rows}.parquet"
            make_input(version_dir, spec, rows, files[rows], seed=rows)
        floor_rates = (
            measure_floor(repo, model, files[sizes[-1]], args.threads, args.repeat)
            if sizes
            else {FLOOR_CHUNKS[0]: 0.0}
        )
        best_chunk = max(floor_rates, key=lambda c: floor_rates[c])
        floor = floor_rates[best_chunk]
        runs = []
        for rows in sizes:
            results = [
                run_engine(repo, model, files[rows], workdir, args.threads, args.chunk_rows)
                for _ in range(args.repeat)
            ]
            for summary, _, _ in results:
                assert summary["rows"]["scored"] == rows, summary
            summary, wall, _ = max(results, key=lambda r: float(r[0]["rows_per_second"]))
            rate = float(summary["rows_per_second"])
            rss = max(float(s["peak_rss_mib"] or 0) for s, _, _ in results)
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
        "contest": contest.summary() if contest is not None else None,
    }
    print(f"\nmodel {model} v{versions[-1]}, {args.threads} inference threads "
          f"on {os.cpu_count()} CPUs")  # fmt: skip
    if contest is not None:
        c = contest.summary()
        print(
            f"contest on {contest.rows:,} rows, median of {contest.rounds} rounds: sluice "
            f"{c['sluice_wall_s_median']:.2f} s (first row {c['sluice_first_row_s_median']:.2f} "
            f"s), script {c['script_wall_s_median']:.2f} s, ratio {c['ratio_median']:.2f}"
        )
    print(f"in-process floor (runtime predict, best chunk {best_chunk:,}): {floor:,.0f} rows/s")
    print(f"{'rows':>10} {'engine rows/s':>14} {'of floor':>9} {'wall s':>7} {'peak RSS MiB':>13}")
    for r in runs:
        print(f"{r.rows:>10,} {r.rows_per_s:>14,.0f} {r.share_of_floor:>9.0%} "
              f"{r.wall_s:>7.1f} {r.peak_rss_mb:>13,.0f}")  # fmt: skip
    if args.write_readme:
        write_section("batch", readme_table(runs, floor, best_chunk, args.threads, argv, contest))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
