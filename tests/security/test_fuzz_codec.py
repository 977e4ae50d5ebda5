"""A bounded atheris run over the codec (``fuzz_codec.py``): no exception but InvalidInput."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_codec.py")
SECONDS = int(os.environ.get("SLUICE_FUZZ_SECONDS", "15"))


def test_atheris_finds_nothing_in_the_codec(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        message = "atheris is not installed (pip install atheris)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(HARNESS), "--seed-corpus", str(corpus)], check=True)
    run = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=2048",
            "-timeout=10",  # one input taking longer than this is a finding (a hang)
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        cwd=HARNESS.parents[2],
    )
    tail = run.stderr[-3000:]
    assert run.returncode == 0, tail
    assert "Done" in tail, tail
    assert not list(tmp_path.glob("crash-*")), tail
