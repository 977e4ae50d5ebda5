"""``sluice serve --workers N``: several processes on one port, one set of metrics, one SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from server.fleet_metrics import LABEL, FleetMetrics
from server.workers import resolve_workers, without_workers_flag

BODY = {
    "inputs": [
        {
            "name": "features",
            "datatype": "FP32",
            "shape": [1, 30],
            "data": [
                *(120.5, 23, 5, 0.7, 0.4, 350.0, 80.0, 4, 9, 20, 900.0, 60.0, 2.0, 400, 900),
                *(1, 1, 0, 0, 0.2, 0.8, 2, 1, 1, 1, 3.0, 1, 34, 0.9, 0),
            ],
        }
    ]
}


class Workers:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log


def start_workers(repo: Path, log: Path, count: int) -> Workers:
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "server", "serve", "--model-repository", str(repo)),
            *("--port", str(port), "--workers", str(count)),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    workers = Workers(process, port, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        # Ready once a scrape sees every worker (each loads its own models).
        try:
            if scraped_workers(workers) == count:
                return workers
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a readiness condition, bounded by the deadline
    process.kill()
    raise RuntimeError(f"workers not ready in 90 s:\n{log.read_text()}")


def scrape(workers: Workers) -> str:
    return httpx.get(f"{workers.url}/metrics", timeout=5).text


def scraped_workers(workers: Workers) -> int:
    for family in text_string_to_metric_families(scrape(workers)):
        if family.name == "sluice_fleet_workers_scraped":
            return int(family.samples[0].value)
    return 0


def answered(workers: Workers) -> Counter[str]:
    """Successful fraud requests per worker, from one scrape."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(scrape(workers)):
        if family.name == "ml_inference_request_success":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["model"] == "fraud":
                    counts[sample.labels[LABEL]] += int(sample.value)
    return counts


@pytest.fixture(scope="module")
def two(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    workers = start_workers(example_repo, tmp_path_factory.mktemp("workers") / "log", 2)
    yield workers
    if workers.process.poll() is None:
        workers.process.kill()
        workers.process.wait()


def test_two_workers_answer_on_one_port_and_the_metrics_count_both(two: Workers) -> None:
    before = answered(two)
    for _ in range(40):
        # A new connection each time: the kernel spreads connections, not requests.
        with httpx.Client(base_url=two.url, timeout=10) as client:
            response = client.post("/v2/models/fraud/infer", json=BODY)
        assert response.status_code == 200
    # Any worker's /metrics reports both; scrape a few times so more than one answers.
    for _ in range(4):
        after = answered(two)
        delta = {w: after[w] - before[w] for w in after}
        assert len(delta) == 2, delta
        assert all(n > 0 for n in delta.values()), delta
        assert sum(delta.values()) == 40


def test_sigterm_drains_every_worker(two: Workers) -> None:
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=two.url, timeout=10) as client:
            while not stop.is_set():
                try:
                    statuses[client.post("/v2/models/fraud/infer", json=BODY).status_code] += 1
                except httpx.TransportError:
                    return  # the server stopped accepting: expected once SIGTERM is in

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(statuses.values()) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for load to be under way, bounded
        two.process.send_signal(signal.SIGTERM)
        assert two.process.wait(60) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    log = two.log.read_text()
    assert log.count("Application shutdown complete") == 2, log[-3000:]
    assert log.count("Finished server process") == 2
    assert set(statuses) == {200}, statuses


def test_workers_auto_is_the_affinity_mask_and_bad_values_are_refused() -> None:
    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError, match="--workers"):
            resolve_workers(bad)
    argv = ["serve", "--workers", "2", "--port", "1", "--workers=3"]
    assert without_workers_flag(argv) == ["serve", "--port", "1"]


def test_one_scrape_merges_every_workers_series(tmp_path: Path) -> None:
    fleets = []
    for name, count in (("host/worker-0", 3), ("host/worker-1", 4)):
        local = CollectorRegistry()
        PromCounter("requests", "Requests", ["model"], registry=local).labels("fraud").inc(count)
        fleets.append(FleetMetrics(local, name, tmp_path))
    try:
        merged = list(fleets[0].collect())
        (requests,) = [f for f in merged if f.name == "requests"]
        totals = {s.labels[LABEL]: s.value for s in requests.samples if s.name == "requests_total"}
        assert totals == {"host/worker-0": 3.0, "host/worker-1": 4.0}
        (scraped,) = [f for f in merged if f.name == "sluice_fleet_workers_scraped"]
        assert scraped.samples[0].value == 2
    finally:
        for fleet in fleets:
            fleet.close()
    assert list(tmp_path.iterdir()) == []
