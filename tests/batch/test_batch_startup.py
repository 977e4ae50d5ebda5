"""``sluice batch`` loads only the model it scores, imports only what the job uses, and skips
converting trees it won't use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from batch_support import feature_table, make_repo, subprocess_args, write_table

# Runs the CLI as `python -m server` does and, at exit, writes every module the process
# imported (any thread) to the file named by its first argument.
PROBE = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
runpy.run_module("server", run_name="__main__", alter_sys=True)
"""

# Nothing a local XGBoost job on Parquet uses: the other runtime and its converter,
# scikit-learn (and the scipy.stats it brings), monitoring, the OpenTelemetry SDK, the web
# layer, Ray, the progress bar, pandas (installed here by Ray Data; pyarrow's own array
# functions import it, 0.15 s) and pyarrow.compute (float columns need no cast).
NOT_FOR_AN_XGBOOST_JOB = (
    "onnxruntime", "onnx", "onnxmltools", "skl2onnx", "sklearn", "scipy.stats",
    "server.core.monitoring.worker", "opentelemetry.sdk", "starlette", "uvicorn",
    "server.http", "ray", "rich", "pandas", "pyarrow.compute",
)  # fmt: skip


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("startup-repo"))


def sluice_batch(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it; its log (stderr) is what these tests read."""
    command = subprocess_args(repo, *args, "--log-level", "info")
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_only_the_scored_model_is_loaded(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(50, seed=3), tmp_path / "in.parquet")
    result = sluice_batch(
        repo, "--model", "tree", "--input", str(source), "--output", str(tmp_path / "out.parquet"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "model tree version" in result.stderr
    assert "model linear" not in result.stderr


def test_large_chunks_skip_the_compiled_trees_and_small_ones_keep_them(
    repo: Path, tmp_path: Path
) -> None:
    source = write_table(feature_table(50, seed=3), tmp_path / "in.parquet")
    runs = {}
    for chunk in ("65536", "10"):
        runs[chunk] = sluice_batch(
            repo, "--model", "tree", "--input", str(source),
            "--output", str(tmp_path / f"out-{chunk}.parquet"), "--chunk-rows", chunk,
        )  # fmt: skip
        assert runs[chunk].returncode == 0, runs[chunk].stderr
    assert "executors compiled" not in runs["65536"].stderr
    assert "executors compiled" in runs["10"].stderr


def imported_by(repo: Path, tmp_path: Path, *args: str) -> set[str]:
    """The modules a real ``sluice batch`` process imported, once it has finished."""
    modules = tmp_path / "modules.json"
    command = subprocess_args(repo, *args)
    command[1:3] = ["-c", PROBE, str(modules)]  # in place of "-m server"
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return set(orjson.loads(modules.read_bytes()))


def loaded(modules: set[str], *names: str) -> list[str]:
    """Which of ``names`` (packages with any of their submodules) were imported."""
    return [n for n in names if any(m == n or m.startswith(f"{n}.") for m in modules)]


def test_an_xgboost_job_imports_neither_onnx_nor_sklearn_nor_monitoring(
    repo: Path, tmp_path: Path
) -> None:
    source = write_table(feature_table(50, seed=3), tmp_path / "in.parquet")
    modules = imported_by(
        repo, tmp_path, "--model", "tree", "--input", str(source),
        "--output", str(tmp_path / "out.parquet"),
    )  # fmt: skip
    assert loaded(modules, "xgboost", "pyarrow") == ["xgboost", "pyarrow"]
    assert loaded(modules, *NOT_FOR_AN_XGBOOST_JOB) == []


def test_an_onnx_job_imports_no_xgboost_and_no_scipy(repo: Path, tmp_path: Path) -> None:
    source = write_table(feature_table(50, seed=3), tmp_path / "in.csv")
    modules = imported_by(
        repo, tmp_path, "--model", "linear", "--input", str(source),
        "--output", str(tmp_path / "out.jsonl"),
    )  # fmt: skip
    assert loaded(modules, "onnxruntime") == ["onnxruntime"]
    assert loaded(modules, "xgboost", "scipy", "sklearn", "opentelemetry.sdk") == []


def test_scikit_learn_stays_usable_in_a_process_that_ran_a_job(repo: Path, tmp_path: Path) -> None:
    """xgboost is imported with scikit-learn hidden, but only while it is imported."""
    source = write_table(feature_table(50, seed=3), tmp_path / "in.parquet")
    script = f"""
import sys
from server.__main__ import main
code = main(["batch", "--model-repository", {str(repo)!r}, "--model", "tree",
             "--input", {str(source)!r}, "--output", {str(tmp_path / "out.parquet")!r},
             "--no-progress"])
assert code == 0, code
assert "xgboost" in sys.modules and "sklearn" not in sys.modules
from sklearn.linear_model import LogisticRegression
print(LogisticRegression().fit([[0.0], [1.0]], [0, 1]).predict([[1.0]])[0])
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
