"""Approvals, the audit log and the prediction log through the V2 app, in process."""

from __future__ import annotations

import hashlib
import hmac
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from server.config import Settings
from server.core.governance.audit import read_audit
from server.core.governance.jsonl import read_records
from server.http.app import create_app

ROW = [0.1, -0.2, 0.3, 0.4]


def body(request_id: str, rows: list[list[float]] | None = None) -> dict[str, Any]:
    rows = rows or [ROW]
    return {
        "id": request_id,
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [len(rows), len(rows[0])],
                "data": [x for row in rows for x in row],
            }
        ],
    }


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


@contextmanager
def serving(repo: Path, **governance: Any) -> Iterator[TestClient]:
    settings = Settings(model_repository=repo, governance=governance)
    with TestClient(create_app(settings)) as client:
        yield client


def audit(repo: Path) -> list[dict[str, Any]]:
    return [r.to_dict() for r in read_audit(repo / ".sluice" / "audit.jsonl")]


def test_an_approval_is_persisted_audited_and_survives_a_restart(repo: Path) -> None:
    with serving(repo) as client:
        assert client.get("/v2/models/tree/versions/2/approval").json()["approved"] is False
        answer = client.post(
            "/v2/models/tree/versions/2/approve",
            json={"actor": "alice", "reason": "validated, ticket RISK-12"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["actor"] == "alice"
        sha256 = answer.json()["sha256"]
        assert len(sha256) == 64
    with serving(repo) as client:
        shown = client.get("/v2/models/tree/versions/2/approval").json()
        assert shown["approved"] is True
        assert (shown["actor"], shown["reason"]) == ("alice", "validated, ticket RISK-12")
        assert client.get("/v2/models/tree/versions/1/approval").json()["approved"] is False
    approvals = [r for r in audit(repo) if r["action"] == "approve"]
    assert len(approvals) == 1
    assert approvals[0]["actor"] == "alice"
    assert (approvals[0]["model"], approvals[0]["version"]) == ("tree", 2)
    assert approvals[0]["figures"]["sha256"] == sha256


def test_an_approval_is_void_once_the_artifact_changes(repo: Path) -> None:
    with serving(repo) as client:
        client.post("/v2/models/tree/versions/1/approve", json={"actor": "a", "reason": "r"})
    shutil.copy(repo / "tree" / "2" / "model.ubj", repo / "tree" / "1" / "model.ubj")
    with serving(repo) as client:
        assert client.get("/v2/models/tree/versions/1/approval").json()["approved"] is False


def test_a_card_with_approved_by_counts_as_approved(repo: Path) -> None:
    (repo / "tree" / "1" / "card.yaml").write_text("approved_by: model-risk-board\n")
    with serving(repo) as client:
        shown = client.get("/v2/models/tree/versions/1/approval").json()
    assert shown["approved"] is True
    assert (shown["actor"], shown["source"]) == ("model-risk-board", "card")


@pytest.mark.parametrize(
    ("path", "doc", "status"),
    [
        ("/v2/models/tree/versions/2/approve", {"actor": "alice"}, 400),
        ("/v2/models/tree/versions/2/approve", {"actor": " ", "reason": "r"}, 400),
        ("/v2/models/tree/versions/2/approve", {"actor": "a", "reason": "r", "x": 1}, 400),
        ("/v2/models/tree/versions/9/approve", {"actor": "a", "reason": "r"}, 404),
        ("/v2/models/nope/versions/1/approve", {"actor": "a", "reason": "r"}, 404),
    ],
)
def test_a_bad_approval_is_refused(repo: Path, path: str, doc: Any, status: int) -> None:
    with serving(repo) as client:
        answer = client.post(path, json=doc)
    assert answer.status_code == status
    assert "error" in answer.json()
    assert not [r for r in audit(repo) if r["action"] == "approve"]


def test_loads_and_unloads_are_audited_from_start_to_shutdown(repo: Path) -> None:
    with serving(repo) as client:
        assert client.post("/v2/repository/models/tree/unload").status_code == 200
        assert client.post("/v2/repository/models/tree/load").status_code == 200
    tree = [(r["action"], r["version"], r["actor"], r["reason"]) for r in audit(repo)]
    tree = [row for row in tree if row[0] in ("load", "unload")]
    assert ("load", 1, "system", "server start") in tree
    assert ("unload", 2, "api", "unload request") in tree
    assert ("load", 2, "api", "load request") in tree
    assert tree[-1][0] == "unload"
    assert tree[-1][3] == "server shutdown"
    loads = [r for r in audit(repo) if r["action"] == "load" and r["model"] == "tree"]
    assert all(
        r["figures"]["state"] == "READY" and len(r["figures"]["sha256"]) == 64 for r in loads
    )


def test_the_prediction_log_names_version_reason_and_status(repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "predictions.jsonl"
    with serving(repo, prediction_log=log) as client:
        assert client.post("/v2/models/tree/infer", json=body("ok-1")).status_code == 200
        assert client.post("/v2/models/tree/versions/1/infer", json=body("ok-2")).status_code == 200
        bad = body("bad-1", [[1.0, 2.0, 3.0]])  # three features, the model takes four
        assert client.post("/v2/models/tree/infer", json=bad).status_code == 400
    records = {r["request_id"]: r for r in read_records(log)}
    assert (records["ok-1"]["version"], records["ok-1"]["reason"]) == (2, "primary")
    assert (records["ok-2"]["version"], records["ok-2"]["reason"]) == (1, "explicit")
    assert records["ok-1"]["status"] == "ok"
    assert records["bad-1"]["status"] == "error"
    assert "InvalidInput" in records["bad-1"]["error"]
    assert all("inputs" not in r and "outputs" not in r for r in records.values())
    assert len(records["ok-1"]["sha256"]) == 64


def test_logged_fields_are_kept_hashed_or_dropped(repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "predictions.jsonl"
    key = "s3cret"
    with serving(
        repo,
        prediction_log=log,
        log_inputs=True,
        log_outputs=True,
        fields={"f0": "hash", "f1": "drop"},
        hash_key=key,
    ) as client:
        assert client.post("/v2/models/tree/infer", json=body("r-1")).status_code == 200
    (record,) = read_records(log)
    features = record["inputs"]["features"]
    assert set(features) == {"f0", "f2", "f3"}
    kept = features["f2"][0]
    assert abs(kept - ROW[2]) < 1e-6
    # Hashed: HMAC-SHA256 of the value's JSON text (the float32 as served), under the key.
    digest = hmac.new(key.encode(), orjson.dumps(float(np.float32(ROW[0]))), hashlib.sha256)
    assert features["f0"] == ["hmac-sha256:" + digest.hexdigest()]
    assert len(record["outputs"]["probability"]) == 1


def test_required_approval_gates_primary_and_canary_traffic(repo: Path) -> None:
    doc = {"primary": "1", "canary": {"version": "2", "weight": 10}}
    with serving(repo, require_approval=True) as client:
        refused = client.put("/v2/models/tree/traffic", json=doc)
        assert refused.status_code == 400
        assert "not approved" in refused.json()["error"]
        for version in (1, 2):
            answer = client.post(
                f"/v2/models/tree/versions/{version}/approve",
                json={"actor": "bob", "reason": "ok"},
            )
            assert answer.status_code == 200
        assert client.put("/v2/models/tree/traffic", json=doc).status_code == 200
    changes = [r for r in audit(repo) if r["action"] == "traffic"]
    assert changes
    assert changes[-1]["model"] == "tree"
