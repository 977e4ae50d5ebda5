"""The result cache seen through the V2 API, on the example models (in process)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import yaml
from asgi_support import serving
from starlette.testclient import TestClient

from server.config import Settings
from server.http.app import create_app

MODELS = ("fraud", "churn")


def with_cache(example_repo: Path, root: Path, enabled: bool = True) -> Path:
    """A copy of the example models with the cache on (or off), fraud on XGBoost alone.

    A hybrid version sends a batch to the compiled trees or to XGBoost by its size,
    switching at a size measured at load (about 26 rows), and the two differ in the
    last bits: a cached row is the row its own batch computed, so the comparisons
    here hold only when every batch size uses the same executor in both servers.
    """
    for model in MODELS:
        shutil.copytree(example_repo / model, root / model)
        path = root / model / "model.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["cache"] = {"enabled": enabled}
        if model == "fraud":
            doc["runtime_options"]["executor"] = "xgboost"
        path.write_text(yaml.safe_dump(doc))
    return root


@pytest.fixture(scope="module")
def clients(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, TestClient]]:
    """(cache off, cache on) over the same artifacts."""
    plain_repo = with_cache(example_repo, tmp_path_factory.mktemp("plain"), enabled=False)
    cached_repo = with_cache(example_repo, tmp_path_factory.mktemp("cached"))
    with (
        TestClient(create_app(Settings(model_repository=plain_repo))) as plain,
        TestClient(create_app(Settings(model_repository=cached_repo))) as cached,
    ):
        yield plain, cached


def holdout(example_repo: Path, model: str, count: int, start: int = 0) -> np.ndarray:
    table = pq.read_table(example_repo / model / "2" / "holdout.parquet")
    config = yaml.safe_load((example_repo / model / "model.yaml").read_text())
    columns = config["inputs"][0]["feature_names"]
    rows = np.column_stack([table.column(c).to_numpy() for c in columns]).astype(np.float32)
    return rows[start : start + count]


def json_body(x: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    return body


def binary_body(x: np.ndarray, datatype: str = "FP32") -> tuple[bytes, dict[str, str]]:
    """``x``'s bytes as one binary tensor, declared as ``datatype``."""
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": datatype,
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def outputs(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    doc = response.json()
    return {o["name"]: (o["datatype"], o["shape"], o["data"]) for o in doc["outputs"]}


def without_id(response: Any) -> tuple[dict[str, Any], bytes]:
    """A binary answer's JSON header (less its generated id) and its raw tensor bytes."""
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:length])
    assert header.pop("id")
    return header, response.content[length:]


def stats(client: TestClient, model: str) -> dict[str, Any]:
    [found] = client.get(f"/v2/models/{model}/versions/2/stats").json()["model_stats"]
    return dict(found)


@pytest.mark.parametrize("model", MODELS)
def test_cached_answers_are_bit_identical_json_and_binary(
    clients: tuple[TestClient, TestClient], example_repo: Path, model: str
) -> None:
    plain, cached = clients
    x = holdout(example_repo, model, 8)
    path = f"/v2/models/{model}/infer"
    want = outputs(plain.post(path, json=json_body(x)))
    before = stats(cached, model)
    assert outputs(cached.post(path, json=json_body(x))) == want  # computed and stored
    for _ in range(3):  # from the cache; the same body from the third time on decoded once
        assert outputs(cached.post(path, json=json_body(x))) == want
    body, headers = binary_body(x)
    want_binary = plain.post(path, content=body, headers=headers)
    for _ in range(3):
        got_binary = cached.post(path, content=body, headers=headers)
        assert without_id(got_binary) == without_id(want_binary)
    after = stats(cached, model)
    assert after["inference_count"] - before["inference_count"] == 8, "rows computed once"
    hits = (
        after["inference_stats"]["cache_hit"]["count"]
        - before["inference_stats"]["cache_hit"]["count"]
    )
    assert hits == 8 * 6
    successes = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    assert successes == 7, "a cached answer is still an answered request of this version"


@pytest.mark.parametrize("model", MODELS)
def test_a_partly_cached_request_equals_an_uncached_one(
    clients: tuple[TestClient, TestClient], example_repo: Path, model: str
) -> None:
    plain, cached = clients
    path = f"/v2/models/{model}/infer"
    x = holdout(example_repo, model, 64, start=100)
    outputs(cached.post(path, json=json_body(x[::2])))  # every other row seen before
    before = stats(cached, model)["inference_count"]
    assert outputs(cached.post(path, json=json_body(x))) == outputs(
        plain.post(path, json=json_body(x))
    )
    assert stats(cached, model)["inference_count"] - before == 32, "only the new rows ran"


def test_an_unloaded_and_reloaded_version_starts_with_no_entries(
    clients: tuple[TestClient, TestClient], example_repo: Path
) -> None:
    _, cached = clients
    path = "/v2/models/fraud/infer"
    x = holdout(example_repo, "fraud", 4, start=300)
    outputs(cached.post(path, json=json_body(x)))
    assert cached.post("/v2/repository/models/fraud/unload").status_code == 200
    assert cached.post("/v2/repository/models/fraud/load").status_code == 200
    before = stats(cached, "fraud")
    outputs(cached.post(path, json=json_body(x)))
    after = stats(cached, "fraud")
    assert (
        after["inference_stats"]["cache_hit"]["count"]
        == before["inference_stats"]["cache_hit"]["count"]
    )
    assert after["inference_count"] - before["inference_count"] == 4


def test_cached_answers_reach_drift_and_feedback(
    clients: tuple[TestClient, TestClient], example_repo: Path
) -> None:
    _, cached = clients
    path = "/v2/models/fraud/infer"
    x = holdout(example_repo, "fraud", 5, start=400)
    outputs(cached.post(path, json=json_body(x, "first-score")))
    rows_before = cached.get("/v2/models/fraud/drift").json()["window"]["rows_total"]
    answer = cached.post(path, json=json_body(x, "cached-score"))
    assert answer.json()["id"] == "cached-score"
    rows_after = cached.get("/v2/models/fraud/drift").json()["window"]["rows_total"]
    assert rows_after - rows_before == 5, "drift saw the cached rows"
    label = {"id": "cached-score", "label": [0, 1, 0, 0, 1]}
    joined = cached.post("/v2/models/fraud/feedback", json=label).json()
    assert joined["matched"] == 1, joined


def test_a_repeated_body_is_still_a_prediction_of_its_version(
    clients: tuple[TestClient, TestClient], example_repo: Path
) -> None:
    """Same bytes but for the id: each answer counted, seen by drift, joined by feedback."""
    plain, cached = clients
    path = "/v2/models/fraud/infer"
    x = holdout(example_repo, "fraud", 1, start=500)
    want = outputs(plain.post(path, json=json_body(x)))
    before = stats(cached, "fraud")["inference_stats"]["success"]["count"]
    rows_before = cached.get("/v2/models/fraud/drift").json()["window"]["rows_total"]
    ids = [f"repeat-{index}" for index in range(6)]
    for request_id in ids:
        answer = cached.post(path, json=json_body(x, request_id))
        assert answer.json()["id"] == request_id
        assert outputs(answer) == want
    generated = {cached.post(path, json=json_body(x)).json()["id"] for _ in range(4)}
    assert len(generated) == 4, "every answer has its own id"
    after = stats(cached, "fraud")["inference_stats"]["success"]["count"]
    assert after - before == 10
    rows_after = cached.get("/v2/models/fraud/drift").json()["window"]["rows_total"]
    assert rows_after - rows_before == 10
    joined = cached.post("/v2/models/fraud/feedback", json={"id": ids[-1], "label": [1]}).json()
    assert joined["matched"] == 1, joined


async def test_rows_computed_for_concurrent_one_row_requests_answer_a_batch_of_them(
    example_repo: Path, tmp_path: Path
) -> None:
    """One-row misses computed together in a batch are stored by the batcher; a later
    48-row request holding those rows runs nothing and gets the same answers."""
    x = holdout(example_repo, "fraud", 48, start=500)
    settings = Settings(model_repository=with_cache(example_repo, tmp_path))
    async with asyncio.timeout(120), serving(settings) as client:
        path = "/v2/models/fraud/infer"
        singles = await asyncio.gather(
            *(client.post(path, json=json_body(x[i : i + 1])) for i in range(48))
        )
        before = (await client.get("/v2/models/fraud/versions/2/stats")).json()["model_stats"][0]
        batch = outputs(await client.post(path, json=json_body(x)))
        after = (await client.get("/v2/models/fraud/versions/2/stats")).json()["model_stats"][0]
    assert before["inference_count"] == 48
    assert before["execution_count"] < 48, "the one-row requests did not form batches"
    assert after["inference_count"] == 48, "the 48-row request computed rows already computed"
    name, (_, shape, data) = next(iter(batch.items()))
    assert shape[0] == 48
    assert data == [v for r in singles for v in outputs(r)[name][2]]


def test_a_row_of_another_datatype_with_the_same_bytes_is_refused_not_answered(
    clients: tuple[TestClient, TestClient], example_repo: Path
) -> None:
    _, cached = clients
    path = "/v2/models/fraud/infer"
    x = holdout(example_repo, "fraud", 1, start=700)
    body, headers = binary_body(x)
    for _ in range(2):
        assert cached.post(path, content=body, headers=headers).status_code == 200  # now cached
    same_bytes, int_headers = binary_body(x, datatype="INT32")
    response = cached.post(path, content=same_bytes, headers=int_headers)
    assert response.status_code == 400
    assert "datatype INT32" in response.json()["error"]
    assert "fraud" in response.json()["error"]
