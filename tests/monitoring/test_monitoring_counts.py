"""Every answered request reaches drift and feedback exactly once, whatever the concurrency."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_support import serving
from monitoring_support import MODEL, build_credit, infer_body, sample
from prometheus_client.parser import text_string_to_metric_families

from server.config import DriftSettings, Settings


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_credit(tmp_path_factory.mktemp("credit"))


async def infer(client: httpx.AsyncClient, body: dict[str, Any], path: str = "") -> str:
    response = await client.post(f"/v2/models/{MODEL}{path}/infer", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def dropped(metrics: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "ml_monitoring_dropped_total":
                return float(s.value)
    raise AssertionError("no ml_monitoring_dropped_total")


async def test_a_full_queue_drops_and_counts_but_never_double_counts(credit_repo: Path) -> None:
    requests = 120
    settings = Settings(model_repository=credit_repo, drift=DriftSettings(queue_size=4))
    async with serving(settings) as client:
        await asyncio.gather(
            *(infer(client, infer_body(sample(1, seed=i))) for i in range(requests))
        )
        report = (await client.get(f"/v2/models/{MODEL}/drift")).json()
        metrics = (await client.get("/metrics")).text
    assert report["window"]["rows_total"] + dropped(metrics) == requests


async def test_feedback_joins_every_concurrent_request_by_its_id(credit_repo: Path) -> None:
    settings = Settings(model_repository=credit_repo)
    xs = [sample(1 + i % 4, seed=100 + i) for i in range(200)]
    async with serving(settings) as client:
        ids = await asyncio.gather(*(infer(client, infer_body(x)) for x in xs))
        labels = [{"id": i, "label": [1] * len(x)} for i, x in zip(ids, xs, strict=True)]
        response = await client.post(f"/v2/models/{MODEL}/feedback", json={"labels": labels})
        again = await client.post(f"/v2/models/{MODEL}/feedback", json={"labels": labels[:3]})
    assert response.json()["matched"] == len(xs)
    assert again.json()["matched"] == 0  # each prediction takes one label


async def test_a_reload_between_requests_loses_no_observation(credit_repo: Path) -> None:
    settings = Settings(model_repository=credit_repo, repository_control=True)
    async with serving(settings) as client:
        for wave in range(2):  # the second wave is likely still waiting for the worker
            await asyncio.gather(
                *(
                    infer(client, infer_body(sample(2, seed=i)))
                    for i in range(15 * wave, 15 * wave + 15)
                )
            )
        reload = await client.post(f"/v2/repository/models/{MODEL}/load")
        assert reload.status_code == 200
        await asyncio.gather(
            *(infer(client, infer_body(sample(3, seed=50 + i))) for i in range(30))
        )
        report = (await client.get(f"/v2/models/{MODEL}/drift")).json()
    assert report["window"]["rows_total"] == 30 * 2 + 30 * 3


async def test_rows_without_the_score_output_count_for_drift_not_for_feedback(
    tiny_repo: Path,
) -> None:
    settings = Settings(model_repository=tiny_repo)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}
        ]
    }
    label_only = {**body, "outputs": [{"name": "label"}]}
    async with serving(settings) as client:

        async def send(doc: dict[str, Any]) -> str:
            response = await client.post("/v2/models/linear/infer", json=doc)
            assert response.status_code == 200, response.text
            return str(response.json()["id"])

        ids = await asyncio.gather(*(send(body if i % 2 else label_only) for i in range(40)))
        labels = [{"id": i, "label": [0, 1]} for i in ids]
        outcome = (await client.post("/v2/models/linear/feedback", json={"labels": labels})).json()
    assert outcome["matched"] == 20
    assert outcome["unmatched_ids"] == ids[0::2]  # the label-only requests
