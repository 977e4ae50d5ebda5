"""``python -m loadtest``: exit codes, one-line errors, JSON and plot outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadtest_support import closed_port, fake_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with fake_server() as url:
        yield url


def loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert run.returncode == code
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("loadtest: error:")
    assert text in lines[0]


def test_unreachable_target_fails_with_one_line() -> None:
    run = loadtest(f"http://127.0.0.1:{closed_port()}", "m", "--duration", "1")
    assert_one_line_error(run, 3, "refused")


def test_missing_model_fails_on_metadata(fake_url: str) -> None:
    run = loadtest(fake_url, "missing")
    assert_one_line_error(run, 4, "404")


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.1.2.3"])
def test_remote_targets_are_refused_without_allow_remote(url: str) -> None:
    run = loadtest(url, "m")
    assert_one_line_error(run, 2, "--allow-remote")


def test_a_run_prints_a_table_and_writes_json(fake_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    run = loadtest(
        fake_url, "fixed", "--concurrency", "4", "--duration", "0.5", "--warmup", "0.1",
        "--binary", "--json-out", str(out),
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert "p99" in run.stdout
    doc = json.loads(out.read_text())
    assert doc["kind"] == "run"
    assert doc["mode"] == "closed"
    assert doc["completed"] == doc["statuses"]["200"] > 0
    assert doc["latency"]["p50_ms"] > 0
    assert doc["options"]["binary"] is True


def test_a_sweep_writes_json_and_a_png(fake_url: str, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    run = loadtest(
        fake_url, "serial_5", "--sweep", "--slo-p99-ms", "50", "--sweep-start", "100",
        "--sweep-factor", "3", "--step-duration", "0.5", "--step-warmup", "0.1",
        "--json-out", str(out), "--plot", str(png),
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    assert doc["kind"] == "sweep"
    assert doc["max_rate_rps"] == 100
    assert [s["passed"] for s in doc["steps"]] == [True, False]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_contradictory_options_are_usage_errors(fake_url: str) -> None:
    run = loadtest(fake_url, "fixed", "--rate", "10", "--concurrency", "2")
    assert_one_line_error(run, 2, "--rate")
