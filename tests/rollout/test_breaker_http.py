"""The circuit breaker over the V2 API: a version whose scores are NaN stops taking traffic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from factory import write_yaml
from rollout_support import WEIGHTS, build_score_repo, infer_body, score_model
from starlette.testclient import TestClient

from server.config import Settings
from server.http.app import create_app

BREAKER = {
    "window_s": 30,
    "min_calls": 10,
    "failure_rate": 0.5,
    "cooldown_s": 600,
    "max_cooldown_s": 1200,
    "probes": 2,
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = build_score_repo(tmp_path / "repo")
    # v5 answers NaN for every row: no exception, a failure all the same.
    nan = np.full_like(WEIGHTS, np.nan)
    (root / "score" / "5").mkdir()
    (root / "score" / "5" / "model.onnx").write_bytes(score_model(nan).SerializeToString())
    config = root / "score" / "model.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["breaker"] = BREAKER
    write_yaml(config, doc)
    return root


@pytest.fixture
def client(repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_repository=repo))) as test_client:
        yield test_client


def test_a_nan_canary_trips_its_breaker_and_the_primary_answers_for_it(
    client: TestClient, repo: Path
) -> None:
    doc = {"primary": "1", "canary": {"version": "5", "weight": 50}}
    assert client.put("/v2/models/score/traffic", json=doc).status_code == 200
    statuses: Counter[int] = Counter()
    answered_by: Counter[tuple[str, str]] = Counter()
    for seed in range(200):
        response = client.post("/v2/models/score/infer", json=infer_body(seed))
        statuses[response.status_code] += 1
        if response.status_code == 200:
            version = response.json()["model_version"]
            assert response.headers["x-model-version"] == version
            answered_by[(version, response.headers.get("x-model-fallback", ""))] += 1
        else:
            error = response.json()["error"]
            assert "non-finite" in error, error
            assert "output 'probability'" in error, error
    # Sequential requests: exactly min_calls failures open it, none after.
    assert statuses[500] == BREAKER["min_calls"], statuses
    assert statuses[200] == 200 - BREAKER["min_calls"]
    assert set(answered_by) == {("1", ""), ("1", "true")}, "only v1 answers once it opened"
    fallbacks = answered_by[("1", "true")]
    assert fallbacks > 20, answered_by

    explicit = client.post("/v2/models/score/versions/5/infer", json=infer_body(1))
    assert explicit.status_code == 503
    assert int(explicit.headers["retry-after"]) > 500
    assert "circuit breaker open" in explicit.json()["error"]

    breakers = client.get("/v2/models/score/traffic").json()["breakers"]
    assert breakers["5"]["state"] == "open"
    assert breakers["5"]["trips"] == 1
    assert breakers["1"]["state"] == "closed"

    metrics = client.get("/metrics").text
    assert 'ml_breaker_state{model="score",version="5"} 2.0' in metrics
    assert f'ml_inference_fallbacks_total{{model="score",version="1"}} {fallbacks}.0' in metrics

    audit = [orjson.loads(line) for line in (repo / ".sluice" / "audit.jsonl").open("rb")]
    tripped = [r for r in audit if r["action"] == "breaker"]
    assert len(tripped) == 1
    assert tripped[0]["model"] == "score"
    assert tripped[0]["version"] == 5
    assert "circuit breaker open" in tripped[0]["reason"]
    assert tripped[0]["figures"]["failures"] == BREAKER["min_calls"]


def test_a_primary_whose_breaker_opened_hands_over_to_its_fallback(client: TestClient) -> None:
    doc = {"primary": "5", "fallback": "2"}
    assert client.put("/v2/models/score/traffic", json=doc).status_code == 200
    answers = [client.post("/v2/models/score/infer", json=infer_body(s)) for s in range(40)]
    tail = answers[BREAKER["min_calls"] :]
    assert all(a.status_code == 200 for a in tail)
    assert {(a.headers["x-model-version"], a.headers["x-model-fallback"]) for a in tail} == {
        ("2", "true")
    }
    shown = client.get("/v2/models/score/traffic").json()
    assert shown["fallback"] == "2"
