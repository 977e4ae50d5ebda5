"""A real Prometheus scrapes a real server: drift, latency and counters seen through PromQL."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from monitoring_support import (
    FEATURES,
    MODEL,
    Server,
    build_credit,
    free_port,
    infer_body,
    sample,
    start_server,
    wait_until,
)

ROUTE = 'http_route="/v2/models/{name}/infer"'
SHIFTED = {"x1": 1.5, "x3": -2.0}
PHASE_ROWS = 2000  # = window_rows x windows below: each phase fills the whole window


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``credit`` version 1 with reference.json and card.yaml. Read-only for tests."""
    return build_credit(tmp_path_factory.mktemp("credit"))


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        response.raise_for_status()
        return list(response.json()["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, at_least: float) -> float:
        def reached() -> float | None:
            value = self.scalar(promql)
            return value if value is not None and value >= at_least else None

        return wait_until(reached, f"{promql} >= {at_least}")


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
    )
    if found is None:
        message = "the prometheus binary is missing (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def server(credit_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "SLUICE_DRIFT__WINDOW_ROWS": "500",
        "SLUICE_DRIFT__WINDOWS": "4",
        "SLUICE_DRIFT__INTERVAL_S": "0.2",
        "SLUICE_LOG_LEVEL": "warning",
    }
    running = start_server(credit_repo, tmp_path_factory.mktemp("log") / "server.log", env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    root = tmp_path_factory.mktemp("prometheus")
    target = server.url.removeprefix("http://")
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: sluice\n    scrape_interval: 1s\n"
        f"    scrape_timeout: 900ms\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    running = Prometheus(process, f"http://127.0.0.1:{port}")

    def ready() -> bool | None:
        if process.poll() is not None:
            raise RuntimeError((root / "prometheus.log").read_text())
        try:
            return httpx.get(f"{running.url}/-/ready", timeout=1).status_code == 200 or None
        except httpx.TransportError:
            return None

    try:
        wait_until(ready, "prometheus to be ready")
        yield running
    finally:
        process.terminate()
        process.wait(30)


def send_phase(server: Server, seed: int, shift: dict[str, float] | None = None) -> None:
    """PHASE_ROWS rows in 20 requests of 100, eight at a time."""
    x = sample(PHASE_ROWS, seed=seed, shift=shift)
    with httpx.Client(base_url=server.url, timeout=30) as client:

        def post(chunk: np.ndarray) -> None:
            response = client.post(f"/v2/models/{MODEL}/infer", json=infer_body(chunk))
            assert response.status_code == 200, response.text

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, np.array_split(x, 20)))


def alerting(prometheus: Prometheus) -> set[str]:
    return {
        r["metric"]["feature"]
        for r in prometheus.query(f'ml_drift_detected{{model="{MODEL}"}} == 1')
    }


def test_drift_alerts_for_exactly_the_shifted_features(
    server: Server, prometheus: Prometheus
) -> None:
    send_phase(server, seed=100)
    rows = f'ml_drift_rows_total{{model="{MODEL}",version="1"}}'
    prometheus.wait_for(rows, PHASE_ROWS)
    features = prometheus.query(f'ml_drift_detected{{model="{MODEL}"}}')
    assert {r["metric"]["feature"] for r in features} == set(FEATURES)
    assert alerting(prometheus) == set()
    assert prometheus.scalar(f'ml_drift_status{{model="{MODEL}"}}') == 0

    send_phase(server, seed=200, shift=SHIFTED)
    prometheus.wait_for(rows, 2 * PHASE_ROWS)
    assert alerting(prometheus) == set(SHIFTED)
    assert prometheus.scalar(f'ml_drift_status{{model="{MODEL}"}}') == 2
    psi = prometheus.query(f'ml_drift_score{{model="{MODEL}",method="psi"}} >= 0.25')
    assert {r["metric"]["feature"] for r in psi} == set(SHIFTED)


def test_latency_histograms_and_counters(server: Server, prometheus: Prometheus) -> None:
    before = prometheus.scalar(f'sum(ml_inference_request_success_total{{model="{MODEL}"}})') or 0
    bad = infer_body(sample(1, seed=300))
    bad["inputs"][0]["datatype"] = "FP64"
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=bad).status_code == 400
    send_phase(server, seed=301)
    successes = before + 20
    prometheus.wait_for(f'sum(ml_inference_request_success_total{{model="{MODEL}"}})', successes)
    count = f"sum(http_server_request_duration_seconds_count{{{ROUTE},http_request_method="
    assert prometheus.scalar(count + '"POST",http_response_status_code="200"})') == successes
    assert prometheus.scalar(count + '"POST",http_response_status_code="400"})') == 1
    inf = prometheus.scalar(
        f'sum(http_server_request_duration_seconds_bucket{{{ROUTE},le="+Inf"}})'
    )
    assert inf == successes + 1
    # Seconds buckets sized for milliseconds (the SDK default would start at 5 s).
    boundaries = prometheus.query(
        f'http_server_request_duration_seconds_bucket{{{ROUTE},http_response_status_code="200"}}'
    )
    assert {"0.0005", "0.005", "0.05", "+Inf"} <= {r["metric"]["le"] for r in boundaries}
    version = f'model="{MODEL}",version="1"'
    failures = f'ml_inference_request_failure_total{{{version},reason="InvalidInput"}}'
    assert prometheus.scalar(failures) == 1
    rows = prometheus.scalar(f"ml_inference_count_total{{{version}}}")
    assert rows is not None
    assert rows >= 3 * PHASE_ROWS
    assert prometheus.scalar(f"ml_inference_batch_size_sum{{{version}}}") == rows
    compute = prometheus.scalar(f"ml_inference_compute_duration_seconds_count{{{version}}}")
    assert compute == prometheus.scalar(f"ml_inference_exec_count_total{{{version}}}")
    assert (prometheus.scalar(f"ml_inference_request_time_seconds_total{{{version}}}") or 0) > 0
    assert prometheus.scalar(f"ml_inference_queue_depth{{{version}}}") == 0
    assert prometheus.scalar('target_info{service_name="sluice"}') == 1
