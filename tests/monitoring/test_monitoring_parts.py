"""Large blocks of observations are counted in parts, the event loop free in between."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asgi_support import serving
from monitoring_support import MODEL, build_credit, infer_body, sample

from server.config import Settings
from server.core.monitoring import worker
from server.core.monitoring.buffer import Block


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_credit(tmp_path_factory.mktemp("credit"))


def block(rows: list[int]) -> Block:
    arrays = [np.full((n, 2), i, dtype=np.float32) for i, n in enumerate(rows)]
    scores: list[np.ndarray | None] = [np.full(n, i, dtype=np.float32) for i, n in enumerate(rows)]
    return Block(
        version=None,  # type: ignore[arg-type]  # not read by parts()
        inputs={"x": arrays},
        outputs={"score": scores},
        ids=[f"r{i}" for i in range(len(rows))],
        partial=False,
    )


def test_a_block_splits_into_whole_requests_of_about_the_rows_asked() -> None:
    whole = block([3, 5, 2, 9, 1, 4, 4])
    parts = list(whole.parts(6))
    assert [p.ids for p in parts] == [["r0"], ["r1"], ["r2"], ["r3"], ["r4", "r5"], ["r6"]]
    assert [sum(map(len, p.inputs["x"])) for p in parts] == [3, 5, 2, 9, 5, 4]
    joined = np.concatenate([a for p in parts for a in p.inputs["x"]])
    np.testing.assert_array_equal(joined, np.concatenate(whole.inputs["x"]))
    small = block([2, 2])
    assert [p is small for p in small.parts(6)] == [True], "small enough: itself"


async def test_rows_counted_in_parts_are_each_counted_once(
    credit_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "PART_ROWS", 16)  # every block of the run in several parts
    xs = [sample(1 + i % 7, seed=i) for i in range(120)]
    async with serving(Settings(model_repository=credit_repo)) as client:

        async def infer(x: np.ndarray) -> str:
            response = await client.post(f"/v2/models/{MODEL}/infer", json=infer_body(x))
            assert response.status_code == 200, response.text
            return str(response.json()["id"])

        ids = await asyncio.gather(*(infer(x) for x in xs))
        report = (await client.get(f"/v2/models/{MODEL}/drift")).json()
        labels: list[dict[str, Any]] = [
            {"id": i, "label": [1] * len(x)} for i, x in zip(ids, xs, strict=True)
        ]
        outcome = (
            await client.post(f"/v2/models/{MODEL}/feedback", json={"labels": labels})
        ).json()
    assert report["window"]["rows_total"] == sum(len(x) for x in xs)
    assert outcome["matched"] == len(xs)
