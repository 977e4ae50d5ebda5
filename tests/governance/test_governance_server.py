"""A real ``sluice serve``: the audit trail of loads, unloads and approvals, and the
regulator's question answered by ``sluice models history fraud --request-id X``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
from conftest import start_server, stop_server

from server.core.governance.audit import read_audit
from server.core.governance.jsonl import read_records

FEATURES = 30


def sluice(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling a file for a condition, bounded by the deadline


def test_the_audit_trail_and_the_regulators_question(example_repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    predictions = tmp_path / "predictions.jsonl"
    env = {
        "SLUICE_GOVERNANCE__STATE_DIR": str(state),
        "SLUICE_GOVERNANCE__PREDICTION_LOG": str(predictions),
    }
    repo = ["--model-repository", str(example_repo)]
    server = start_server(example_repo, tmp_path / "server.log", env=env)
    try:
        url = server.url
        approved = httpx.post(
            f"{url}/v2/models/fraud/versions/2/approve",
            json={"actor": "alice", "reason": "model risk review MR-7"},
            timeout=30,
        )
        assert approved.status_code == 200, approved.text
        assert httpx.post(f"{url}/v2/repository/models/fraud/unload", timeout=60).status_code == 200
        assert httpx.post(f"{url}/v2/repository/models/fraud/load", timeout=60).status_code == 200
        # Approved offline while the server runs: the server sees it at once.
        local = sluice(
            env, "models", "approve", "fraud:1", "--actor", "carol", "--reason", "r", *repo
        )
        assert local.returncode == 0, local.stderr
        shown = httpx.get(f"{url}/v2/models/fraud/versions/1/approval", timeout=30).json()
        assert shown["actor"] == "carol"
        doc = {
            "id": "txn-0042",
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [1, FEATURES],
                    "data": [0.5] * FEATURES,
                }
            ],
        }
        answer = httpx.post(f"{url}/v2/models/fraud/infer", json=doc, timeout=30)
        assert answer.status_code == 200, answer.text
        version = int(answer.json()["model_version"])
        wait_for(
            lambda: any(r.get("request_id") == "txn-0042" for r in read_records(predictions)),
            "the prediction record",
        )
    finally:
        stop_server(server)

    trail = [r for r in read_audit(state / "audit.jsonl") if r.model == "fraud"]
    actions = [(r.action, r.actor, r.reason) for r in trail]
    assert ("load", "system", "server start") in actions
    assert ("approve", "alice", "model risk review MR-7") in actions
    assert ("unload", "api", "unload request") in actions
    assert ("load", "api", "load request") in actions
    assert ("approve", "carol", "r") in actions
    assert ("unload", "system", "server shutdown") in actions

    # The one documented command, human-readable and as JSON.
    history = sluice(env, "models", "history", "fraud", "--request-id", "txn-0042", *repo)
    assert history.returncode == 0, history.stderr
    assert f"scored by version {version}" in history.stdout
    assert "approved by alice" in history.stdout
    as_json = sluice(env, "models", "history", "fraud", "--request-id", "txn-0042", "--json", *repo)
    (line,) = as_json.stdout.splitlines()
    explained = orjson.loads(line)
    assert (explained["version"], explained["why"], explained["status"]) == (2, "primary", "ok")
    assert explained["approval"]["actor"] == "alice"
    assert explained["loaded"]["reason"] == "load request"

    listing = sluice(env, "models", "history", "fraud", *repo)
    assert listing.returncode == 0
    assert "approve" in listing.stdout
    unknown = sluice(env, "models", "history", "fraud", "--request-id", "nope", *repo)
    assert unknown.returncode == 1
    assert "no prediction" in unknown.stderr
