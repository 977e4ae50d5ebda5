"""The circuit breaker on an injected clock, and how the router passes over a broken version."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from server.core.breaker import BreakerEvent, BreakerState, CircuitBreaker
from server.core.catalog import VersionState
from server.core.model_config import BreakerConfig
from server.core.routing import Reason, Router
from server.core.traffic import TrafficDocument
from server.errors import ModelNotReady


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CONFIG = BreakerConfig(window_s=10, min_calls=10, failure_rate=0.5, cooldown_s=5, probes=3)


def breaker(clock: Clock, events: list[BreakerEvent] | None = None) -> CircuitBreaker:
    return CircuitBreaker(CONFIG, "fraud", 2, events.append if events is not None else None, clock)


def test_opens_only_once_enough_requests_failed_and_says_why() -> None:
    clock, events = Clock(), []  # type: ignore[var-annotated]
    b = breaker(clock, events)
    for _ in range(4):
        b.record(1, ok=False)
    assert b.closed, "4 failures are fewer than min_calls 10"
    for _ in range(6):
        b.record(1, ok=True)
    assert b.closed, "4 of 10 failed: under the 50 % threshold"
    b.record(1, ok=False)  # 5 of 11
    assert b.closed
    b.record(1, ok=False)  # 6 of 12
    assert not b.closed
    assert b.state is BreakerState.OPEN
    assert not b.admit()
    assert [e.state for e in events] == [BreakerState.OPEN]
    assert "6 of 12 requests failed" in events[0].reason
    assert events[0].figures["failures"] == 6


def test_old_failures_leave_the_window() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(9):
        b.record(1, ok=False)
    clock.now += 11  # past window_s
    for _ in range(9):
        b.record(1, ok=True)
    b.record(1, ok=False)
    assert b.closed, "1 of 10 in the window failed"


def test_half_open_probes_close_it_and_a_failed_probe_doubles_the_cooldown() -> None:
    clock, events = Clock(), []  # type: ignore[var-annotated]
    b = breaker(clock, events)
    b.record(10, ok=False)
    assert not b.admit()
    assert b.retry_after_s() == pytest.approx(5)
    clock.now += 5
    assert b.state is BreakerState.HALF_OPEN
    assert [b.admit() for _ in range(4)] == [True, True, True, False], "3 probes, no more"
    b.record(1, ok=False)
    assert b.state is BreakerState.OPEN
    assert b.retry_after_s() == pytest.approx(10), "a failed probe doubles the cooldown"
    clock.now += 10
    assert b.admit()
    for _ in range(3):
        b.record(1, ok=True)
    assert b.closed
    assert b.admit()
    assert [e.state for e in events] == [BreakerState.OPEN, BreakerState.OPEN, BreakerState.CLOSED]
    assert b.trips == 2


def test_probes_that_never_ran_do_not_keep_it_half_open_for_ever() -> None:
    clock = Clock()
    b = breaker(clock)
    b.record(10, ok=False)
    clock.now += 5
    assert [b.admit() for _ in range(3)] == [True, True, True]
    assert not b.admit()  # the probes were refused before compute: no outcome
    clock.now += 5
    assert b.admit(), "a new round of probes after another cooldown"


def test_a_disabled_breaker_never_opens() -> None:
    b = CircuitBreaker(BreakerConfig(enabled=False), "fraud", 2)
    b.record(1000, ok=False)
    assert b.closed


# -- the router -------------------------------------------------------------------------


def version(number: int, clock: Clock) -> Any:
    return SimpleNamespace(
        name="m",
        version=number,
        state=VersionState.READY,
        reason="",
        breaker=CircuitBreaker(CONFIG, "m", number, None, clock),
    )


def router(doc: dict[str, Any], clock: Clock) -> tuple[Router, dict[int, Any]]:
    versions = {n: version(n, clock) for n in (1, 2, 3)}
    entry = SimpleNamespace(name="m", config=None, versions=versions, why=lambda: "")
    r = Router()
    r.update(entry)  # type: ignore[arg-type]
    r.set_traffic("m", TrafficDocument.model_validate(doc))
    return r, versions


def test_a_broken_canary_sends_its_requests_to_the_primary_marked_fallback() -> None:
    clock = Clock()
    r, versions = router({"primary": "1", "canary": {"version": "3", "weight": 100}}, clock)
    assert r.choose("m").serving is versions[3]
    versions[3].breaker.record(10, ok=False)
    route = r.choose("m")
    assert route.serving is versions[1]
    assert route.reason is Reason.FALLBACK


def test_a_broken_primary_falls_back_to_the_documents_fallback_then_fails_fast() -> None:
    clock = Clock()
    r, versions = router({"primary": "2", "fallback": "1"}, clock)
    versions[2].breaker.record(10, ok=False)
    route = r.choose("m")
    assert (route.serving, route.reason) == (versions[1], Reason.FALLBACK)
    for v in (1, 3):
        versions[v].breaker.record(10, ok=False)
    with pytest.raises(ModelNotReady, match="circuit breaker open") as caught:
        r.choose("m")
    assert caught.value.retry_after_s >= 1
    clock.now += 5
    assert r.choose("m").serving is versions[2], "half-open: the primary gets a probe"


def test_an_explicit_version_with_its_breaker_open_is_refused_with_retry_after() -> None:
    clock = Clock()
    r, versions = router({"primary": "1"}, clock)
    versions[2].breaker.record(10, ok=False)
    with pytest.raises(ModelNotReady, match="version 2 is failing") as caught:
        r.choose("m", 2)
    assert caught.value.retry_after_s == pytest.approx(5)
    assert r.choose("m", 1).serving is versions[1]
