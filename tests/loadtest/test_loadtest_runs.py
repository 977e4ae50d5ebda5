"""Closed and open loop against servers of known behaviour: what the harness measures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loadtest_support import closed_port, fake_server

from loadtest import (
    BodySpec,
    RequestPool,
    Target,
    fetch_metadata,
    random_pool,
    run_closed,
    run_open,
)


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with fake_server() as url:
        yield url


async def pool_for(url: str, model: str) -> tuple[Target, RequestPool]:
    target = Target.from_url(url, model)
    return target, random_pool(target, await fetch_metadata(target), BodySpec(pool_size=16))


async def test_closed_loop_measures_the_server_delay(fake_url: str) -> None:
    target, pool = await pool_for(fake_url, "delay_20")

    result = await run_closed(target, pool, concurrency=8, duration=1.0, warmup=0.2)

    assert result.errors == {}
    assert result.completed > 0
    assert result.statuses == {200: result.completed}
    assert result.completed == sum(result.statuses.values()) == result.ok
    assert result.latency.count == result.ok
    assert 20.0 <= result.latency.p50_ms < 200.0
    assert result.latency.p99_ms >= 20.0
    assert result.latency.max_ms >= result.latency.p99_ms >= result.latency.p50_ms


async def test_open_loop_counts_queueing_from_the_intended_send_time(fake_url: str) -> None:
    # The 50th request (0.25 s in at 200/s) stalls the server for 0.5 s; ~100 requests
    # are due meanwhile, but only 8 connections can carry them.
    target, pool = await pool_for(fake_url, "stall_500_at_50")
    connections = 8

    result = await run_open(
        target, pool, rate=200, duration=2.0, connections=connections, request_timeout=5.0
    )

    assert result.errors == {}
    assert result.ok == result.completed == pytest.approx(400, abs=2)
    assert result.latency.max_ms >= 500.0
    # From the intended time, everything scheduled during the stall was late...
    assert result.count_over(100.0) >= 50
    assert result.latency.p90_ms >= 100.0
    # ...while timing from the actual write (the naive way) sees only the requests
    # that were on the wire when it began.
    assert result.count_over(100.0, service=True) <= connections
    assert result.service.p90_ms < 100.0


async def test_non_2xx_statuses_are_counted_by_code(fake_url: str) -> None:
    target, pool = await pool_for(fake_url, "status_503_every_3")

    result = await run_closed(target, pool, concurrency=4, duration=0.5)

    assert result.errors == {}
    assert set(result.statuses) == {200, 503}
    assert result.completed == result.statuses[200] + result.statuses[503]
    assert result.ok == result.statuses[200] == result.latency.count
    assert result.failed == result.statuses[503] > 0


async def test_connect_refused_is_counted_in_both_loops(fake_url: str) -> None:
    _, pool = await pool_for(fake_url, "fixed")
    nowhere = Target("127.0.0.1", closed_port(), "fixed")

    closed = await run_closed(nowhere, pool, concurrency=2, duration=0.3)
    opened = await run_open(nowhere, pool, rate=100, duration=0.3, request_timeout=0.2)

    assert closed.completed == 0
    assert set(closed.errors) == {"connect_refused"}
    assert closed.errors["connect_refused"] >= 2
    assert opened.completed == 0
    assert opened.errors["connect_refused"] >= 1
    # Requests that never found a connection count as timed out, not as vanished.
    assert opened.errors["timeout"] == pytest.approx(30, abs=2)


@pytest.mark.parametrize(
    ("model", "kind"),
    [("delay_5000", "timeout"), ("drop", "reset"), ("garbage", "parse_error")],
)
async def test_transport_errors_are_counted_by_kind(fake_url: str, model: str, kind: str) -> None:
    target, pool = await pool_for(fake_url, model)

    result = await run_closed(target, pool, concurrency=2, duration=0.5, request_timeout=0.2)

    assert result.completed == 0
    assert set(result.errors) == {kind}
    assert result.errors[kind] >= 2


@pytest.mark.parametrize("model", ["chunked", "closing"])
async def test_chunked_and_closing_responses_are_not_errors(fake_url: str, model: str) -> None:
    target, pool = await pool_for(fake_url, model)

    result = await run_closed(target, pool, concurrency=2, duration=0.3)

    assert result.errors == {}
    assert result.ok == result.completed > 0
