"""Rollouts against a real ``sluice serve`` under concurrent load; every response counted."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningServer, start_server, stop_server
from load_support import Load, eventually, failures
from rollout_support import build_score_repo, infer_body

TRAFFIC = "/v2/models/score/traffic"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(build_score_repo(tmp_path / "repo"), tmp_path / "server.log")
    yield running
    stop_server(running)


def put(server: RunningServer, doc: dict[str, Any]) -> dict[str, Any]:
    response = httpx.put(f"{server.url}{TRAFFIC}", json=doc, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def traffic(server: RunningServer) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}{TRAFFIC}", timeout=10).json())


async def keyed(
    server: RunningServer, keys: list[str], concurrency: int = 16
) -> list[tuple[str, int, str]]:
    """Each key's request, ``concurrency`` at a time: (key, status, version)."""
    out: list[tuple[str, int, str]] = []
    queue = list(keys)
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:

        async def worker() -> None:
            while queue:
                key = queue.pop()
                response = await client.post(
                    "/v2/models/score/infer",
                    json=infer_body(hash(key) % 1000),
                    headers={"x-routing-key": key},
                )
                out.append((key, response.status_code, response.headers.get("x-model-version", "")))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def test_a_ten_percent_canary_gets_ten_percent_of_keys_and_keys_never_flip(
    server: RunningServer,
) -> None:
    put(server, {"primary": "1", "canary": {"version": "2", "weight": 10}})
    keys = [f"customer-{i}" for i in range(1000)] * 5
    answers = asyncio.run(keyed(server, keys))
    assert len(answers) == 5000
    assert {status for _, status, _ in answers} <= {200, 503}  # 503: see failures()
    answers = [a for a in answers if a[1] == 200]
    assert len(answers) > 4900
    by_key: dict[str, set[str]] = {}
    for key, _, version in answers:
        by_key.setdefault(key, set()).add(version)
    assert all(len(v) == 1 for v in by_key.values()), "a key always lands on one version"
    canary_keys = {k for k, v in by_key.items() if v == {"2"}}
    canary_share = sum(1 for _, _, v in answers if v == "2") / len(answers)
    assert 0.08 <= canary_share <= 0.12, canary_share
    put(server, {"primary": "1", "canary": {"version": "2", "weight": 50}})
    again = [a for a in asyncio.run(keyed(server, sorted(by_key))) if a[1] == 200]
    now_canary = {k for k, _, v in again if v == "2"}
    assert canary_keys <= now_canary, "raising the weight only moves keys to the canary"
    assert 0.4 <= len(now_canary) / len(by_key) <= 0.6


def test_a_failing_shadow_never_reaches_the_client(server: RunningServer) -> None:
    put(server, {"primary": "1", "shadows": [{"version": "4", "sample": 1.0}]})
    with Load(server) as load:
        eventually(
            lambda: (
                next(v for v in traffic(server)["versions"] if v["role"] == "shadow")[
                    "copies_failed"
                ]
                >= 100
            ),
            "the shadow's failures",
        )
    assert failures(load.statuses) == 0, load.statuses
    assert set(load.versions) - {""} == {"1"}, "the shadow's answers never reach the client"


def test_a_shadow_that_agrees_is_paired_exactly(server: RunningServer) -> None:
    put(server, {"primary": "1", "shadows": [{"version": "2", "sample": 1.0}]})
    with Load(server):
        shadow = eventually(
            lambda: next(
                (
                    v
                    for v in traffic(server)["versions"]
                    if v["role"] == "shadow" and v["paired_rows"] >= 200
                ),
                None,
            ),
            "paired shadow rows",
        )
    assert shadow["agreement"] == 1.0
    assert shadow["mean_abs_score_diff"] == 0.0


AUTO = {
    "interval_s": 1,
    "min_requests": 60,
    "steps": [20, 50, 100],
    "pair_sample": 1.0,
    "auto": True,
}


@pytest.mark.parametrize(("version", "why"), [("3", "agreement"), ("4", "circuit breaker open")])
def test_a_broken_canary_is_rolled_back_automatically(
    server: RunningServer, version: str, why: str
) -> None:
    put(server, {"primary": "1", "canary": {"version": version, "weight": 20}, "analysis": AUTO})
    with Load(server) as load:
        rolled = eventually(
            lambda: (doc := traffic(server))["state"] == "rolled_back" and doc, "the rollback"
        )
        errors_at_rollback = failures(load.statuses)
        served_at_rollback = load.versions[version]
        after = sum(load.statuses.values())
        eventually(lambda: sum(load.statuses.values()) >= after + 200, "traffic after the rollback")
    assert rolled["canary"]["weight"] == 0
    assert why in rolled["reason"], rolled["reason"]
    assert rolled["last_analysis"]["verdict"] == "breach"
    assert load.versions[version] <= served_at_rollback + 16, "no canary answers after the rollback"
    errors = failures(load.statuses)
    assert errors == errors_at_rollback, "no client errors after the rollback"
    if version == "3":
        assert errors == 0, "flipped scores raise no error: only the comparison catches them"
    else:
        # The breaker opened on the failures it counted; past that, at most the requests
        # already in flight (one per load thread) could still reach the canary.
        counted = re.search(r"(\d+) of \d+ requests failed", rolled["reason"])
        assert counted is not None, rolled["reason"]
        assert errors <= int(counted[1]) + len(load.threads), (errors, rolled["reason"])


def test_a_good_canary_is_promoted_through_every_step(server: RunningServer) -> None:
    put(server, {"primary": "1", "canary": {"version": "2", "weight": 20}, "analysis": AUTO})
    seen_weights = set()
    with Load(server) as load:

        def promoted() -> dict[str, Any] | None:
            doc = traffic(server)
            if doc["canary"]:
                seen_weights.add(doc["canary"]["weight"])
            assert doc["state"] != "rolled_back", doc["reason"]
            return doc if doc["state"] == "promoted" else None

        doc = eventually(promoted, "the promotion", timeout=90)
    assert doc["primary"] == "2"
    assert doc["canary"] is None
    assert {20.0, 50.0, 100.0} <= seen_weights | {100.0}
    assert failures(load.statuses) == 0, load.statuses
    log = server.log.read_text()
    assert "step to 50" in log
    assert "step to 100" in log


def test_a_change_on_one_process_is_applied_by_another(tmp_path: Path) -> None:
    repo = build_score_repo(tmp_path / "shared")
    a = start_server(repo, tmp_path / "a.log")
    try:
        b = start_server(repo, tmp_path / "b.log")
        try:
            put(a, {"primary": "1", "canary": {"version": "2", "weight": 100}})
            adopted = eventually(
                lambda: (doc := traffic(b))["canary"] is not None and doc,
                "B adopting A's change",
                15,
            )
            assert adopted["canary"] == {"version": "2", "weight": 100.0}
            answer = httpx.post(f"{b.url}/v2/models/score/infer", json=infer_body(5), timeout=10)
            assert answer.headers["x-model-version"] == "2"
        finally:
            stop_server(b)
    finally:
        stop_server(a)


def test_the_cli_sets_a_canary_and_rolls_it_back(server: RunningServer) -> None:
    import json
    import subprocess
    import sys

    def cli(*words: str) -> dict[str, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "server",
                "models",
                "traffic",
                "score",
                *words,
                "--url",
                server.url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(json.loads(done.stdout))

    shown = cli()
    assert shown["state"] == "stable"
    canary = cli("canary", "2", "--weight", "100", "--reason", "try v2")
    assert canary["canary"] == {"version": "2", "weight": 100.0}
    answer = httpx.post(f"{server.url}/v2/models/score/infer", json=infer_body(3), timeout=10)
    assert answer.headers["x-model-version"] == "2"
    rolled = cli("rollback", "--reason", "pager went off")
    assert rolled["state"] == "rolled_back"
    assert "pager went off" in rolled["reason"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "models",
            "traffic",
            "score",
            "canary",
            "9",
            "--url",
            server.url,
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "canary version 9 is not served" in bad.stderr
