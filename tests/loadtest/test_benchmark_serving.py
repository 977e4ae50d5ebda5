"""The serving benchmark, fast, on real floor and Sluice servers; no MLServer, no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from loadtest.benchmarks.serving_results import WORKLOADS

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- bench:serving:start -->", "<!-- bench:serving:end -->"
BEFORE = f"# Project\n\nProse above.\n\n{START}\n"
AFTER = f"\n{END}\n\n<!-- bench:telemetry:start -->\nkept\n<!-- bench:telemetry:end -->\n"
TINY = [
    "--duration", "0.3", "--warmup", "0.1", "--settle", "0",
    "--sweep-step-duration", "0.2", "--sweep-step-warmup", "0.05", "--sweep-factor", "2",
]  # fmt: skip


def test_quick_run_measures_every_workload_and_writes_only_its_readme_section(
    example_repo: Path, tmp_path: Path
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEFORE}(not run yet)\n{AFTER}")
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    out = tmp_path / "results" / "serving.json"
    contenders = "floor,sluice-nobatch,sluice,sluice-cache,mlserver"
    command = [
        sys.executable, "-m", "loadtest.benchmarks.serving", "--quick", *TINY,
        "--model-repository", str(example_repo), "--contenders", contenders,
        # A venv that cannot be created stands for an MLServer that cannot be installed.
        "--mlserver-venv", str(blocked / "venv"),
        "--json-out", str(out), "--write-readme", "--readme", str(readme),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr

    doc = orjson.loads(out.read_bytes())
    measured = {"floor", "sluice-nobatch", "sluice"}
    states = {k: c["state"] for k, c in doc["contenders"].items()}
    assert states == {**dict.fromkeys(measured, "measured"), "sluice-cache": "skipped",
                      "mlserver": "unavailable"}  # fmt: skip
    assert "--with-cache" in doc["contenders"]["sluice-cache"]["reason"]
    assert [w["key"] for w in doc["workloads"]] == [w.key for w in WORKLOADS]
    for workload in doc["workloads"]:
        assert set(workload["results"]) == measured, workload["key"]
        for result in workload["results"].values():
            assert result.get("runs") or result.get("sweeps")
    assert doc["workloads"][0]["results"]["sluice"]["runs"][0]["ok"] > 0
    assert "equal in-process predictions" in doc["contenders"]["sluice"]["verified"]
    assert [t["key"] for t in doc["targets"]] == ["a", "b", "c", "d", "e"]
    assert doc["in_process"]["predict_1row_us"] > 0
    assert doc["in_process"]["compiled_1row_us"] > 0, "the compiled trees are timed too"

    text = readme.read_text()
    assert text.startswith(BEFORE)
    assert text.endswith(AFTER)
    section = text[len(BEFORE) : -len(AFTER)]
    assert "(not run yet)" not in section
    assert "| workload |" in section
    assert "Sluice no batching" in section
    assert "python -m loadtest.benchmarks.serving --quick" in section
