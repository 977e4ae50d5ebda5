"""The adaptive limit on requests in progress, driven by the times it is told."""

from __future__ import annotations

from server.http.overload import AdaptiveLimit


def tick(limit: AdaptiveLimit, seconds: float, requests: int = 100, peak: int = 500) -> None:
    for _ in range(requests):
        limit.finished(seconds)
    limit.peak = peak
    limit.adjust()


def test_below_saturation_nothing_is_limited() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(50):
        tick(limit, 0.004)
    assert limit.limit == 1024


def test_slow_answers_shrink_the_limit_and_quick_ones_grow_it_back() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    tick(limit, 0.040)  # one slow tick may be a pause: nothing changes yet
    assert limit.limit == 1024
    tick(limit, 0.040)  # four times the target twice running: halved at most per tick
    assert limit.limit == 512
    for _ in range(20):
        tick(limit, 0.040)
    assert limit.limit == limit.floor == 64
    for _ in range(200):
        tick(limit, 0.002)
    assert limit.limit == 1024


def test_a_slow_model_is_not_shed_for_missing_a_target_it_never_could_meet() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(30):
        tick(limit, 0.050, peak=2)  # quiet: 50 ms is this model's own time
    assert limit.target >= 0.090
    for _ in range(30):
        tick(limit, 0.080)  # busy, but within twice its own time
    assert limit.limit == 1024


def test_an_overloaded_server_does_not_raise_its_own_target() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(1000):
        tick(limit, 0.030, peak=600)  # every tick busy
    assert limit.target == 0.010
    assert limit.limit == limit.floor


def test_one_slow_moment_or_a_few_slow_answers_change_nothing() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=100)
    for _ in range(10):
        tick(limit, 1.0)
        tick(limit, 0.001)
    tick(limit, 1.0, requests=5)
    tick(limit, 1.0, requests=5)
    assert limit.limit == 100


def test_an_idle_tick_lets_the_limit_recover() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=100)
    tick(limit, 1.0)
    tick(limit, 1.0)
    assert limit.limit < 100
    for _ in range(100):
        limit.adjust()  # no traffic at all
    assert limit.limit == 100
