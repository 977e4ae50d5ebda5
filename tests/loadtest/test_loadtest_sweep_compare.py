"""Sweep finds a known capacity; compare measures two targets under the same load."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from loadtest_support import fake_server

from loadtest import (
    Arm,
    BodySpec,
    ClosedLoad,
    SweepPlan,
    SweepStep,
    Target,
    fetch_metadata,
    random_pool,
    run_compare,
    run_sweep,
)


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with fake_server() as url:
        yield url


async def arm(url: str, model: str) -> Arm:
    target = Target.from_url(url, model)
    return Arm(target, random_pool(target, await fetch_metadata(target), BodySpec(pool_size=8)))


async def test_sweep_stops_at_the_capacity_of_a_serial_server(fake_url: str) -> None:
    # One request at a time, 5 ms each: at most ~200 requests/s whatever is offered.
    side = await arm(fake_url, "serial_5")
    plan = SweepPlan(
        slo_p99_ms=50.0,
        start_rps=50.0,
        factor=1.5,
        step_duration=1.0,
        step_warmup=0.2,
        connections=16,
    )
    seen: list[SweepStep] = []

    sweep = await run_sweep(side.target, side.bodies, plan, on_step=seen.append)

    assert seen == sweep.steps
    assert sweep.steps[0].passed
    assert not sweep.steps[-1].passed
    assert sweep.max_rate is not None
    assert 50.0 <= sweep.max_rate < 220.0
    doc = sweep.to_dict()
    assert doc["max_rate_rps"] == sweep.max_rate
    assert len(doc["steps"]) == len(sweep.steps)


def test_sweep_rates_grow_by_factor_or_step() -> None:
    by_factor = SweepPlan(slo_p99_ms=10, start_rps=100, factor=2, max_rps=800)
    by_step = SweepPlan(slo_p99_ms=10, start_rps=100, step_rps=50, max_rps=250)
    assert list(by_factor.rates()) == [100, 200, 400, 800]
    assert list(by_step.rates()) == [100, 150, 200, 250]
    with pytest.raises(ValueError, match="factor"):
        SweepPlan(slo_p99_ms=10, factor=1.0)


async def test_compare_alternates_targets_and_reports_ratios(fake_url: str) -> None:
    fast, slow = await arm(fake_url, "delay_5"), await arm(fake_url, "delay_20")
    order = []

    result = await run_compare(
        fast,
        slow,
        ClosedLoad(concurrency=4, duration=0.4, warmup=0.1),
        rounds=2,
        on_run=lambda side, n, _: order.append((n, side)),
    )

    assert order == [(0, "A"), (0, "B"), (1, "A"), (1, "B")]
    assert len(result.runs_a) == len(result.runs_b) == 2
    assert result.a.endswith("delay_5")
    assert result.b.endswith("delay_20")
    assert result.ratios["p50_ms"] > 1.5
    assert result.ratios["ok_rps"] < 0.67
    assert result.median_b["p50_ms"] >= 20.0
    assert math.isnan(result.ratios["failed"])
    doc = result.to_dict()
    assert set(doc["ratio_b_over_a"]) == set(doc["median_a"]) == set(doc["median_b"])
