"""Load against a real server for the rollout tests: every answer counted, and polling."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from conftest import RunningServer
from rollout_support import infer_body

T = TypeVar("T")


def eventually(check: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)  # polling the server's state, bounded by the deadline
    raise AssertionError(f"timed out waiting for {what}")


def failures(statuses: Counter[int]) -> int:
    """Answers that are neither 200 nor overload shedding (503 + Retry-After, which a
    shared machine can trigger in the admission control: not the canary's doing)."""
    return sum(n for status, n in statuses.items() if status not in (200, 503))


@dataclass
class Load:
    """Unkeyed traffic from a few threads until stopped; every answer counted."""

    server: RunningServer
    path: str = "/v2/models/score/infer"
    body: Callable[[int], dict[str, Any]] = infer_body
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for index in range(4):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.server.url, timeout=20) as client:
            seed = index
            deadline = time.monotonic() + 120  # bounded even if never stopped
            while not self.stop.is_set() and time.monotonic() < deadline:
                seed += 4
                response = client.post(self.path, json=self.body(seed))
                self.statuses[response.status_code] += 1
                self.versions[response.headers.get("x-model-version", "")] += 1

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
