"""The traffic document over the V2 API, in process: validation, routing, headers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rollout_support import build_score_repo, infer_body
from starlette.testclient import TestClient

from server.config import Settings
from server.http.app import create_app

PATH = "/v2/models/score/traffic"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    repo = build_score_repo(tmp_path / "repo")
    with TestClient(create_app(Settings(model_repository=repo))) as test_client:
        yield test_client


def put(client: TestClient, doc: dict[str, Any]) -> Any:
    return client.put(PATH, json=doc)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"primary": "9"}, "primary version 9 is not served"),
        ({"primary": "1", "canary": {"version": "2", "weight": 150}}, "canary.weight"),
        ({"primary": "1", "shadows": [{"version": "3", "sample": 2}]}, "shadows.0.sample"),
        ({"primary": "1", "shadows": [{"version": "1", "sample": 0.5}]}, "also the primary"),
        ({"primary": "1", "canary": {"version": "1", "weight": 5}}, "both primary and canary"),
        ({"primary": "1", "surprise": True}, "surprise"),
        ({"primary": "01"}, "positive integer"),
        ({"primary": "1", "analysis": {"steps": [50, 10, 100]}}, "steps must rise"),
    ],
)
def test_a_bad_document_is_400_naming_the_reason(
    client: TestClient, doc: dict[str, Any], words: str
) -> None:
    response = put(client, doc)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    assert "model 'score'" in response.json()["error"]


def test_get_shows_the_document_state_and_figures(client: TestClient) -> None:
    before = client.get(PATH).json()
    assert before["state"] == "stable"
    assert before["primary"] is None
    doc = {"primary": "1", "canary": {"version": "2", "weight": 100}}
    after = put(client, doc).json()
    assert after["canary"] == {"version": "2", "weight": 100.0}
    assert after["state"] == "progressing"
    assert after["reason"]
    assert {v["role"] for v in after["versions"]} == {"primary", "canary"}


def test_answers_name_their_version_and_explicit_versions_win(client: TestClient) -> None:
    put(client, {"primary": "1", "canary": {"version": "2", "weight": 100}})
    canary = client.post("/v2/models/score/infer", json=infer_body(1))
    assert canary.json()["model_version"] == "2"
    assert canary.headers["x-model-version"] == "2"
    pinned = client.post("/v2/models/score/versions/1/infer", json=infer_body(1))
    assert pinned.json()["model_version"] == "1"
    assert pinned.headers["x-model-version"] == "1"
    put(client, {"primary": "3"})
    assert (
        client.post("/v2/models/score/infer", json=infer_body(1)).headers["x-model-version"] == "3"
    )


def test_manual_promote_and_rollback(client: TestClient) -> None:
    put(client, {"primary": "1", "canary": {"version": "2", "weight": 10}})
    rolled = client.post(f"{PATH}/rollback", json={"actor": "alice", "reason": "bad smell"}).json()
    assert rolled["state"] == "rolled_back"
    assert rolled["canary"]["weight"] == 0
    assert "bad smell" in rolled["reason"]
    assert (
        client.post("/v2/models/score/infer", json=infer_body(2)).headers["x-model-version"] == "1"
    )
    put(client, {"primary": "1", "canary": {"version": "2", "weight": 10}})
    promoted = client.post(f"{PATH}/promote", json={"actor": "bob"}).json()
    assert promoted["state"] == "promoted"
    assert promoted["primary"] == "2"
    assert promoted["canary"] is None
    assert client.post(f"{PATH}/promote").status_code == 400, "nothing left to promote"
    assert client.post(f"{PATH}/sideways").status_code == 400


def test_traffic_survives_a_restart(tmp_path: Path) -> None:
    repo = build_score_repo(tmp_path / "repo")
    with TestClient(create_app(Settings(model_repository=repo))) as first:
        put(first, {"primary": "1", "canary": {"version": "2", "weight": 30}})
    with TestClient(create_app(Settings(model_repository=repo))) as second:
        doc = second.get(PATH).json()
    assert doc["primary"] == "1"
    assert doc["canary"] == {"version": "2", "weight": 30.0}
    assert doc["state"] == "progressing"
