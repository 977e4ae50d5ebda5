"""Two real server processes and a real redis-server: one cache, one feedback store.

Redis is killed in the middle of a load run to show that losing it costs no
request.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import redis
import yaml
from conftest import ROOT, RunningServer, start_server, stop_server
from redis_support import RedisServer

T = TypeVar("T")
X = np.random.default_rng(11).normal(size=(6, 30)).astype(np.float32)


def eventually(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll a condition until it holds, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None and found is not False:
            return found
        time.sleep(0.05)  # polling a condition in another process, bounded by the deadline
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cached_repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet-repo")
    shutil.copytree(example_repo / "fraud", root / "fraud")
    path = root / "fraud" / "model.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["cache"] = {"enabled": True}
    path.write_text(yaml.safe_dump(doc))
    return root


@pytest.fixture
def fleet(
    cached_repo: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[RunningServer, RunningServer]]:
    env = {"SLUICE_REDIS__URL": redis_server.url, "SLUICE_CACHE__BACKEND": "redis"}
    a = start_server(cached_repo, tmp_path / "a.log", env)
    try:
        b = start_server(cached_repo, tmp_path / "b.log", env)
    except BaseException:
        stop_server(a)
        raise
    yield a, b
    stop_server(a)
    stop_server(b)


def infer(server: RunningServer, x: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
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
    if request_id:
        body["id"] = request_id
    response = httpx.post(f"{server.url}/v2/models/fraud/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def stats(server: RunningServer) -> dict[str, Any]:
    doc = httpx.get(f"{server.url}/v2/models/fraud/versions/2/stats", timeout=10).json()
    return dict(doc["model_stats"][0])


def keys(redis_server: RedisServer, pattern: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return list(client.keys(pattern))
    finally:
        client.close()


def test_two_processes_share_cache_entries(
    fleet: tuple[RunningServer, RunningServer], redis_server: RedisServer
) -> None:
    a, b = fleet
    from_a = infer(a, X)
    eventually(lambda: len(keys(redis_server, "sluice:cache:*")) >= len(X), "A's rows in Redis")
    before = stats(b)
    from_b = infer(b, X)
    after = stats(b)
    assert from_b["outputs"] == from_a["outputs"]
    assert after["inference_count"] == before["inference_count"], "B ran no model"
    hits = (
        after["inference_stats"]["cache_hit"]["count"]
        - before["inference_stats"]["cache_hit"]["count"]
    )
    assert hits == len(X)


def test_a_label_posted_to_b_joins_a_prediction_made_by_a(
    fleet: tuple[RunningServer, RunningServer], redis_server: RedisServer
) -> None:
    a, b = fleet
    infer(a, X[:3], request_id="scored-on-a")
    eventually(lambda: keys(redis_server, "sluice:feedback:scored-on-a"), "A's prediction in Redis")
    label = {"id": "scored-on-a", "label": [0, 1, 0]}
    joined = httpx.post(f"{b.url}/v2/models/fraud/feedback", json=label, timeout=10).json()
    assert joined["matched"] == 1, joined
    again = httpx.post(f"{a.url}/v2/models/fraud/feedback", json=label, timeout=10).json()
    assert again["matched"] == 0, "one label per prediction, whichever replica it reaches"


def test_killing_redis_mid_run_fails_no_request(
    fleet: tuple[RunningServer, RunningServer], redis_server: RedisServer, tmp_path: Path
) -> None:
    a, _ = fleet
    report = tmp_path / "load.json"
    load = subprocess.Popen(
        [
            sys.executable, "-m", "loadtest", a.url, "fraud",
            "--concurrency", "8", "--duration", "6", "--warmup", "0",
            "--pool-size", "64", "--json-out", str(report), "--quiet",
        ],
        cwd=ROOT,
    )  # fmt: skip
    try:
        start = stats(a)["inference_stats"]["success"]["count"]
        eventually(
            lambda: stats(a)["inference_stats"]["success"]["count"] > start + 500, "load running"
        )
        redis_server.stop()
        assert load.wait(60) == 0
    finally:
        if load.poll() is None:
            load.kill()
    result = json.loads(report.read_text())
    assert result["completed"] > 1000
    assert result["ok"] == result["completed"], result["statuses"]
    assert not result["errors"], result["errors"]
    metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
    assert "ml_store_available 0.0" in metrics
    assert "Redis unavailable" in a.log.read_text()
