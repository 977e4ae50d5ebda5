"""A killed or interrupted run resumes from its last completed chunk to the same output.

The runs are real ``sluice batch`` processes. The test waits, by polling the
manifest, until at least one chunk is durable, then kills the process.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from batch_support import (
    feature_table,
    make_repo,
    read_table,
    sluice_batch,
    subprocess_args,
    write_table,
)

ROWS = 300_000
CHUNK = "200"


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tiny_repo, tmp_path_factory.mktemp("batch-repo"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same rows as CSV and Parquet, with an unparsable or NaN value every 997 rows."""
    folder = tmp_path_factory.mktemp("inputs")
    table = feature_table(ROWS, seed=3)
    f1 = table.column("f1").to_numpy().copy()
    f1[::997] = np.nan
    table = table.set_column(2, "f1", pa.array(f1))
    return {
        "csv": write_table(table, folder / "in.csv"),
        "parquet": write_table(table, folder / "in.parquet"),
    }


def completed_chunks(manifest: Path) -> int:
    try:
        return int(orjson.loads(manifest.read_bytes())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def interrupt(args: list[str], output: Path, how: signal.Signals) -> int:
    """Start a run, send ``how`` once a chunk is durable, return its exit code."""
    manifest = output.with_name(output.name + ".sluice-manifest.json")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while completed_chunks(manifest) < 1:
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"run ended (rc={process.returncode}) before a chunk was durable:\n"
                            f"{stderr}")  # fmt: skip
            time.sleep(0.005)  # polling the manifest, bounded by the deadline
        process.send_signal(how)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not output.exists(), "an interrupted run must not publish its output"
    assert completed_chunks(manifest) >= 1
    return code


def score(repo: Path, source: Path, output: Path, *extra: str) -> list[str]:
    return subprocess_args(
        repo, "--model", "tree", "--input", str(source), "--output", str(output),
        "--keep-columns", "id,segment", "--chunk-rows", CHUNK, "--on-error", "quarantine",
        *extra,
    )  # fmt: skip


def test_sigkill_then_resume_equals_an_uninterrupted_run(
    repo: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    source = inputs["csv"]
    reference, output = tmp_path / "reference.csv", tmp_path / "out.csv"
    subprocess.run(score(repo, source, reference), check=True, timeout=300)

    code = interrupt(score(repo, source, output), output, signal.SIGKILL)
    assert code == -signal.SIGKILL
    summary = tmp_path / "summary.json"
    resumed = subprocess.run(
        score(repo, source, output, "--resume", "--summary", str(summary)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr

    assert output.read_bytes() == reference.read_bytes()
    quarantine = Path(f"{output}.quarantine.jsonl").read_bytes()
    assert quarantine == Path(f"{reference}.quarantine.jsonl").read_bytes()
    doc = orjson.loads(summary.read_bytes())
    assert doc["resumed"] is True
    rows = doc["rows"]
    assert rows["read"] == ROWS
    assert rows["quarantined"] == len(range(0, ROWS, 997))
    assert rows["read"] == rows["scored"] + rows["skipped"] + rows["quarantined"]
    assert not list(tmp_path.glob("*.sluice-*")), "temporary files left behind"


def test_ctrl_c_exits_130_and_leaves_a_resumable_run(
    repo: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    source = inputs["parquet"]
    reference, output = tmp_path / "reference.parquet", tmp_path / "out.parquet"
    subprocess.run(score(repo, source, reference), check=True, timeout=300)

    # Smaller chunks than the reference run's: the Parquet run is fast enough that with
    # 200-row chunks it could finish (and rightly publish) before the signal landed.
    code = interrupt(score(repo, source, output, "--chunk-rows", "20"), output, signal.SIGINT)
    assert code == 130
    resumed = subprocess.run(
        score(repo, source, output, "--resume"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert read_table(output).equals(read_table(reference))
    quarantine = Path(f"{output}.quarantine.jsonl").read_bytes()
    assert quarantine == Path(f"{reference}.quarantine.jsonl").read_bytes()


def test_resume_with_other_options_or_another_input_is_refused(
    repo: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    source = inputs["csv"]
    output = tmp_path / "out.csv"
    interrupt(score(repo, source, output), output, signal.SIGKILL)

    other_model = sluice_batch(
        repo, "--model", "linear", "--input", str(source), "--output", str(output),
        "--keep-columns", "id,segment", "--on-error", "quarantine", "--resume",
    )  # fmt: skip
    assert other_model.code == 2
    assert "cannot resume" in other_model.stderr
    assert "model=tree" in other_model.stderr

    other_input = write_table(feature_table(10), tmp_path / "other.csv")
    moved = sluice_batch(
        repo, "--model", "tree", "--input", str(other_input), "--output", str(output),
        "--keep-columns", "id,segment", "--on-error", "quarantine", "--resume",
    )  # fmt: skip
    assert moved.code == 2
    assert "the input file changed" in moved.stderr
    assert completed_chunks(output.with_name("out.csv.sluice-manifest.json")) >= 1


def test_a_new_run_without_resume_starts_over(
    repo: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    source = write_table(feature_table(500), tmp_path / "small.parquet")
    output = tmp_path / "out.parquet"
    (tmp_path / "out.parquet.sluice-manifest.json").write_text("{}")
    (tmp_path / "out.parquet.sluice-tmp").write_text("half a file")
    result = sluice_batch(repo, "--model", "tree", "--input", str(source), "--output", str(output))
    assert result.code == 0, result.stderr
    assert read_table(output).num_rows == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "small.parquet"]
