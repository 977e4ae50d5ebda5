"""``sluice serve --workers N`` as a test fixture: started on a free port, ready when every
worker answers a scrape."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

READY_S = 90


class Workers:
    def __init__(
        self, process: subprocess.Popen[bytes], port: int, log: Path, scheme: str = "http"
    ) -> None:
        self.process = process
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.log = log

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_workers(
    repo: Path,
    log: Path,
    count: int,
    *args: str,
    env: dict[str, str] | None = None,
    scheme: str = "http",
) -> Workers:
    """The supervisor and ``count`` workers; returns once a scrape sees every worker.

    ``scheme`` https: the readiness scrape does not check the certificate (the test does).
    """
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "server", "serve", "--model-repository", str(repo)),
            *("--port", str(port), "--workers", str(count), *args),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    workers = Workers(process, port, log, scheme)
    deadline = time.monotonic() + READY_S
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
    raise RuntimeError(f"workers not ready in {READY_S} s:\n{log.read_text()}")


def scrape(workers: Workers) -> str:
    return httpx.get(f"{workers.url}/metrics", timeout=5, verify=False).text


def scraped_workers(workers: Workers) -> int:
    for family in text_string_to_metric_families(scrape(workers)):
        if family.name == "sluice_fleet_workers_scraped":
            return int(family.samples[0].value)
    return 0
