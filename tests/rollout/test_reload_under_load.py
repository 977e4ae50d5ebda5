"""Hot reload under load: versions appear, change, break and disappear on disk while a
real server answers, and not one request fails."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import yaml
from conftest import RunningServer, start_server, stop_server
from load_support import Load, eventually
from rollout_support import build_score_repo, infer_body
from starlette.testclient import TestClient

from server.config import Settings
from server.http.app import create_app

FRAUD = "/v2/models/fraud"


def fraud_body(seed: int) -> dict[str, Any]:
    rows = np.random.default_rng(seed).random((1, 30), dtype=np.float32)
    return {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [1, 30],
                "data": rows.ravel().tolist(),
            }
        ]
    }


@pytest.fixture
def repo(example_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(example_repo / "fraud", root / "fraud", ignore=shutil.ignore_patterns(".*"))
    return root


@pytest.fixture
def server(repo: Path, tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(repo, tmp_path / "server.log", env={"SLUICE_REPOSITORY_POLL_S": "0.2"})
    yield running
    stop_server(running)


def audit(repo: Path) -> list[dict[str, Any]]:
    path = repo / ".sluice" / "audit.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def loaded(repo: Path, version: int, sha256: str | None = None) -> dict[str, Any] | None:
    """The audit record of the poller loading ``version`` (with that artifact), if any."""
    for record in audit(repo):
        if (
            record["actor"] == "repository-poll"
            and record["action"] == "load"
            and record["version"] == version
            and (sha256 is None or record["figures"]["sha256"] == sha256)
        ):
            return record
    return None


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_versions_come_change_break_and_go_under_load_without_a_failed_request(
    server: RunningServer, repo: Path
) -> None:
    model = repo / "fraud"
    with Load(server, path=f"{FRAUD}/infer", body=fraud_body) as load:
        eventually(lambda: load.versions["2"] >= 50, "traffic on version 2")

        # A new version: copied in, loaded once complete, and it takes the traffic.
        shutil.copytree(model / "1", model / "3")
        eventually(lambda: load.versions["3"] >= 50, "version 3 answering")

        # Version 3's artifact replaced: rebuilt and swapped in under load.
        shutil.copy(model / "2" / "model.ubj", model / "3" / "model.ubj")
        new_sha = sha(model / "3" / "model.ubj")
        eventually(lambda: loaded(repo, 3, new_sha), "version 3 reloaded")
        answered = sum(load.statuses.values())
        eventually(lambda: sum(load.statuses.values()) >= answered + 100, "traffic after it")

        # A broken version 4: it never replaces version 3.
        (model / "4").mkdir()
        (model / "4" / "model.ubj").write_bytes(b"not a booster")
        failed = eventually(lambda: loaded(repo, 4), "version 4 tried")
        answered = sum(load.statuses.values())
        eventually(lambda: sum(load.statuses.values()) >= answered + 100, "traffic after it")

    assert failed["figures"]["state"] == "UNAVAILABLE", failed
    assert "cannot load XGBoost model" in failed["reason"], failed["reason"]
    assert "Stack trace" not in failed["reason"], "the reason is XGBoost's message, not its dump"
    assert set(load.statuses) == {200}, load.statuses
    assert set(load.versions) == {"2", "3"}, load.versions
    index = httpx.post(f"{server.url}/v2/repository/index", json={}, timeout=10).json()
    states = {row.get("version"): row["state"] for row in index}
    assert states == {"3": "READY", "4": "UNAVAILABLE"}, index


def test_a_version_folder_removed_from_disk_is_unloaded_under_load(
    server: RunningServer, repo: Path
) -> None:
    model = repo / "fraud"
    config = yaml.safe_load((model / "model.yaml").read_text())
    with Load(server, path=f"{FRAUD}/infer", body=fraud_body) as load:
        eventually(lambda: load.versions["2"] >= 50, "traffic on version 2")
        config["version_policy"] = {"all": True}
        (model / "model.yaml").write_text(yaml.safe_dump(config))
        shutil.copytree(model / "1", model / "3")
        eventually(lambda: load.versions["3"] >= 50, "version 3 answering")
        shutil.rmtree(model / "1")  # an old version that takes no traffic
        eventually(
            lambda: "1" not in httpx.get(f"{server.url}{FRAUD}", timeout=10).json()["versions"],
            "version 1 gone",
        )
        answered = sum(load.statuses.values())
        eventually(lambda: sum(load.statuses.values()) >= answered + 100, "traffic after it")
    assert set(load.statuses) == {200}, load.statuses
    index = httpx.post(f"{server.url}/v2/repository/index", json={}, timeout=10).json()
    assert {(row.get("version"), row["state"]) for row in index} == {
        ("2", "READY"),
        ("3", "READY"),
    }, index


def test_a_reload_that_fails_leaves_what_serves_in_place(tmp_path: Path) -> None:
    repo = build_score_repo(tmp_path / "repo")
    config = repo / "score" / "model.yaml"
    good = config.read_text()
    with TestClient(create_app(Settings(model_repository=repo))) as client:
        before = client.get("/v2/models/score/versions/2/stats").json()
        config.write_text(good.replace("FP32", "FP99", 1))
        answer = client.post("/v2/repository/models/score/load", json={})
        assert answer.status_code == 400
        assert "keep serving" in answer.json()["error"], answer.json()
        assert "inputs.0.datatype" in answer.json()["error"], answer.json()
        served = client.post("/v2/models/score/versions/2/infer", json=infer_body(1))
        assert served.status_code == 200

        # Version 2's artifact broken on disk: the reload keeps the loaded one.
        config.write_text(good)
        (repo / "score" / "2" / "model.onnx").write_bytes(b"garbage")
        answer = client.post("/v2/repository/models/score/load", json={})
        assert answer.status_code == 400
        assert "version 2" in answer.json()["error"], answer.json()
        served = client.post("/v2/models/score/versions/2/infer", json=infer_body(1))
        assert served.status_code == 200
        after = client.get("/v2/models/score/versions/2/stats").json()
        count = after["model_stats"][0]["inference_count"]
        assert count == before["model_stats"][0]["inference_count"] + 4, (
            "the same version object kept serving: its statistics carried on"
        )
