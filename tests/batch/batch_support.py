"""Helpers shared by the batch tests: a repository, input files, running the CLI."""

from __future__ import annotations

import io
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from factory import FEATURES, onnx_config, write_yaml, xgboost_config

from server.__main__ import main

FEATURE_NAMES = [f"f{i}" for i in range(FEATURES)]


def make_repo(tiny_repo: Path, root: Path) -> Path:
    """``tree`` (XGBoost, output probability) and ``linear`` (ONNX, label + probabilities [-1, 2]).

    Both match columns f0..f3 by name; artifacts are copied from the tiny repository.
    """
    features = {
        "name": "features",
        "datatype": "FP32",
        "shape": [-1, FEATURES],
        "feature_names": FEATURE_NAMES,
    }
    write_yaml(root / "tree" / "model.yaml", xgboost_config())
    write_yaml(root / "linear" / "model.yaml", onnx_config(inputs=[features]))
    for model in ("tree", "linear"):
        for version in ("1", "2"):
            shutil.copytree(tiny_repo / model / version, root / model / version)
    return root


def feature_table(rows: int, seed: int = 0) -> pa.Table:
    """An ``id`` column, features f0..f3 as float64, and a text column ``segment``."""
    rng = np.random.default_rng(seed)
    columns: dict[str, object] = {"id": np.arange(rows, dtype=np.int64)}
    for name in FEATURE_NAMES:
        columns[name] = rng.normal(size=rows)
    columns["segment"] = np.array(["a", "b", "c"])[rng.integers(0, 3, rows)]
    return pa.table(columns)


def write_table(table: pa.Table, path: Path) -> Path:
    """Write ``table`` in the format named by the extension."""
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=max(1, table.num_rows // 4))
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        with path.open("wb") as handle:
            for row in table.to_pylist():
                handle.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
    return path


def read_table(path: Path) -> pa.Table:
    """Read an output file or a directory of Parquet parts back."""
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts])
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return pa.Table.from_pylist(lines)


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def sluice_batch(repo: Path, *args: str) -> Result:
    """Run ``sluice batch`` in this process, as the CLI would."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["batch", "--model-repository", str(repo), "--no-progress", "--log-level", "warning"]
    with redirect_stdout(out), redirect_stderr(err):
        code = main([*argv, *args])
    return Result(code, out.getvalue(), err.getvalue())


def subprocess_args(repo: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "server", "batch", "--model-repository", str(repo),
        "--no-progress", "--log-level", "warning", *args,
    ]  # fmt: skip
