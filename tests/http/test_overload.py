"""Overload: the edge's adaptive limit on requests in progress, driven by the times it is
told, and a model's own admission target from model.yaml, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from asgi_support import lifespan
from factory import train_xgboost, write_yaml, xgboost_config
from starlette.types import Receive, Scope, Send

from server.config import Settings
from server.http.app import create_app
from server.http.overload import HOLD_TICKS, LEAST, SHED, STORM, TICK_S, TIGHT, AdaptiveLimit


def tick(
    limit: AdaptiveLimit,
    seconds: float,
    requests: int = 100,
    fewest: int = 0,
    refused: int = 0,
    shed: int = 0,
) -> None:
    """One tick in which ``requests`` were answered in ``seconds`` each, the busiest start
    finding ``fewest`` others in progress, ``refused`` were turned away at the edge and
    ``shed`` let in and then refused by their model's queue."""
    for _ in range(requests):
        limit.finished(seconds)
    limit.started(fewest)
    limit.refused += refused
    limit.shed += shed
    limit.adjust(TICK_S)


def test_below_saturation_nothing_is_limited() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(50):
        tick(limit, 0.004)
    assert limit.limit == 1024


def test_slow_answers_shrink_the_limit_and_quick_ones_grow_it_back() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    tick(limit, 0.040, requests=1000)  # one slow tick may be a pause: nothing changes yet
    assert limit.limit == 1024
    tick(limit, 0.040, requests=1000)  # twice running: 20,000 answers/s x 10 ms let in
    assert limit.limit == 201
    for _ in range(20):
        tick(limit, 0.040, fewest=60)
    assert limit.limit == limit.floor == 64, "nothing refused: never below the floor"
    for _ in range(200):
        tick(limit, 0.002)
    assert limit.limit == 1024


def test_a_closed_loop_that_fills_the_floor_is_never_shed() -> None:
    # 64 clients waiting for their answers: 64 in progress, none refused, whatever the time.
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(200):
        tick(limit, 0.030, requests=100, fewest=63)
    assert limit.limit == 64
    assert not limit.shedding


def test_a_slow_model_is_not_shed_for_missing_a_target_it_never_could_meet() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(30):
        tick(limit, 0.050, requests=2)  # quiet: 50 ms is this model's own time
    assert limit.target >= 0.090
    for _ in range(30):
        tick(limit, 0.080)  # busy, but within twice its own time
    assert limit.limit == 1024


def test_an_overloaded_server_does_not_raise_its_own_target() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(1000):
        tick(limit, 0.030, fewest=40)  # every tick busy: 60 in progress on average
    assert limit.target == 0.010
    assert limit.limit == limit.floor


def test_excess_demand_on_a_standing_queue_is_shed_down_to_a_quiet_time() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(50):
        tick(limit, 0.001, requests=20)  # quiet: a request takes 1 ms
    for _ in range(10):
        tick(limit, 0.040, fewest=300)  # twice the sustainable rate arrives
    assert limit.limit == limit.floor
    tick(limit, 0.008, fewest=60, refused=100)  # refusing half at the floor
    assert not limit.shedding, "once may be a burst"
    tick(limit, 0.008, fewest=60, refused=100)
    assert limit.shedding
    assert limit.target == pytest.approx(TIGHT * 0.001, rel=0.01)
    for _ in range(20):
        tick(limit, 0.008, fewest=limit.limit - 2, refused=100)
    assert limit.limit == LEAST, "fewer than the floor let in: each answered sooner"
    for _ in range(5):
        tick(limit, 0.0025, fewest=limit.limit - 2, refused=100)
    assert LEAST < limit.limit < limit.floor, "under the tight target it grows back"


def test_demand_within_capacity_ends_shedding() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(10):
        tick(limit, 0.040, fewest=300)
    for _ in range(30):  # 400 answers a tick, as many refused: twice the capacity
        tick(limit, 0.006, requests=400, fewest=limit.limit - 2, refused=400)
    assert limit.shedding
    assert limit.limit < limit.floor
    # Demand falls to 90 % of the capacity; some still find the tight limit full.
    tick(limit, 0.003, requests=340, fewest=0, refused=20)
    assert limit.shedding, "once may be a lull"
    tick(limit, 0.003, requests=340, fewest=0, refused=20)
    assert not limit.shedding
    assert limit.limit >= limit.floor


def test_clients_that_send_again_as_soon_as_refused_are_let_in() -> None:
    # A closed loop of 128 that ignores Retry-After, over a floor of 64: every refused
    # client sends again at once, dozens of refusals per answer.
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(10):
        tick(limit, 0.040, fewest=120)
    assert limit.limit == limit.floor
    tick(limit, 0.014, requests=460, fewest=63, refused=460 * int(STORM + 1))
    assert limit.limit == limit.floor, "once may be a tick of few answers"
    tick(limit, 0.014, requests=460, fewest=63, refused=460 * int(STORM + 1))
    assert limit.limit == 128, "doubled: let them wait their turn instead"
    for _ in range(HOLD_TICKS - 1):  # 128 in progress, 14 ms each: over the 10 ms target
        tick(limit, 0.014, requests=460, fewest=127)
    assert limit.limit >= 128, "held while the storm may come back"
    assert not limit.shedding


def shedding_limit(ticks: int) -> AdaptiveLimit:
    """A limit shedding twice the sustainable rate on a standing queue for ``ticks``."""
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(10):
        tick(limit, 0.040, fewest=300)
    for _ in range(ticks):
        tick(limit, 0.008, fewest=limit.limit - 2, refused=100)
    assert limit.shedding
    return limit


def test_a_storm_ends_shedding() -> None:
    limit = shedding_limit(30)
    tick(limit, 0.002, fewest=limit.limit - 2, refused=100 * int(STORM + 1))
    assert limit.shedding, "once may be a tick of few answers"
    tick(limit, 0.002, fewest=limit.limit - 2, refused=100 * int(STORM + 1))
    assert not limit.shedding
    assert limit.limit >= 2 * limit.floor


def test_what_the_models_refuse_after_decoding_is_refused_at_the_edge_instead() -> None:
    # 2x load, 16-row requests: the edge let 512 in, the model's queue refused most of them
    # after their bodies were decoded, quickly, so the answers' times looked fine.
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(50):
        tick(limit, 0.001, requests=20)
    tick(limit, 0.003, requests=100, fewest=400, shed=400)
    assert limit.limit == 1024, "once may be a burst"
    tick(limit, 0.003, requests=100, fewest=400, shed=400)
    assert limit.shedding, "refused by the model is excess demand too"
    assert limit.limit == LEAST
    for _ in range(5):  # the edge refuses now, before decoding; the model refuses nothing
        tick(limit, 0.002, requests=300, fewest=limit.limit - 2, refused=300)
    assert limit.shedding
    assert limit.limit < limit.floor


def test_the_models_refusals_are_not_taken_for_a_storm() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(10):
        tick(limit, 0.040, fewest=300)
    for _ in range(3):  # few answers, many refused: most of them by the model
        tick(limit, 0.003, requests=20, fewest=60, refused=100, shed=400)
    assert limit.shedding
    assert limit.limit == LEAST


def test_a_flash_sale_is_not_let_in_for_a_storm() -> None:
    # Ten times the sustainable rate in an open loop: ten refusals an answer, as many as
    # a closed loop sending again at once, but letting more in does not make them fewer.
    limit = shedding_limit(3)
    shed_to = limit.limit
    for _ in range(2):  # taken for clients sending again at once: let in
        tick(limit, 0.004, requests=100, fewest=limit.limit - 2, refused=1000)
    assert not limit.shedding
    assert limit.limit >= 2 * limit.floor
    tick(limit, 0.004, requests=100, fewest=limit.limit - 2, refused=1000)
    assert limit.shedding, "still refused as often once let in: demand, not a storm"
    assert limit.limit == shed_to
    for _ in range(HOLD_TICKS - 1):
        tick(limit, 0.004, requests=100, fewest=limit.limit - 2, refused=1000)
        assert limit.shedding, "and not taken for one again"
        assert limit.limit < limit.floor


def test_a_queue_building_up_is_seen_before_its_answers_are_late() -> None:
    limit = AdaptiveLimit(target_s=0.010, ceiling=1024)
    for _ in range(2):  # answers still quick, but 500 in progress at 20,000 answers/s: 25 ms
        for _ in range(1000):
            limit.finished(0.002)
        limit.active = 500
        limit.adjust(TICK_S)
    assert limit.limit == 201


def test_a_surge_does_not_raise_the_quiet_time() -> None:
    limit = AdaptiveLimit(target_s=0.001, ceiling=1024)
    for _ in range(50):
        tick(limit, 0.001, requests=20)  # quiet: 1 ms
    tick(limit, 0.150, requests=1)  # the first answer of a surge, alone in its tick
    assert limit.target == pytest.approx(0.002, rel=0.5)


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


def test_without_a_target_the_limit_stays_where_it_is_set() -> None:
    limit = AdaptiveLimit(target_s=None, ceiling=100)
    for _ in range(20):
        tick(limit, 1.0, fewest=90, refused=500)
    assert limit.limit == 100
    assert not limit.shedding


BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.5] * 4}]}
)


@pytest.fixture(scope="module")
def targets_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tight``: a target queueing delay of 1 us in model.yaml; ``adaptive``: the default."""
    root = tmp_path_factory.mktemp("targets")
    batching = {"max_batch_size": 32, "max_queue_delay_ms": 2.0}
    tight = {**batching, "target_queue_delay_ms": 0.001}
    for name, config in (("tight", tight), ("adaptive", batching)):
        write_yaml(root / name / "model.yaml", xgboost_config(batching=config))
        train_xgboost(root / name / "1")
    return root


@asynccontextmanager
async def serving(
    repo: Path, scopes: list[Scope] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process; ``scopes`` collects each request's scope once it is answered."""
    app = create_app(Settings(model_repository=repo, inference_threads=1))

    async def recording(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)
        if scopes is not None:
            scopes.append(scope)

    transport = httpx.ASGITransport(app=recording)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://sluice") as client,
    ):
        yield client


async def burst(client: httpx.AsyncClient, model: str, requests: int) -> list[httpx.Response]:
    path = f"/v2/models/{model}/infer"
    first = await client.post(path, content=BODY)  # one batch measured: waits can be predicted
    assert first.status_code == 200, first.text
    # All started in one turn of the loop: the first one's batch is computing while the
    # others queue behind it.
    return list(await asyncio.gather(*(client.post(path, content=BODY) for _ in range(requests))))


async def test_a_model_with_a_tight_target_sheds_a_burst_its_default_would_queue(
    targets_repo: Path,
) -> None:
    async with serving(targets_repo) as client:
        tight = await burst(client, "tight", 32)
        adaptive = await burst(client, "adaptive", 32)
    statuses = sorted({r.status_code for r in tight})
    assert statuses == [200, 503], statuses
    refused = [r for r in tight if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert "over the model's target of 0.0 ms" in refused[0].json()["error"]
    assert [r.status_code for r in adaptive] == [200] * 32, "the default target queues them"


async def test_the_edge_is_told_which_answers_were_the_models_refusals(targets_repo: Path) -> None:
    # The edge's limit counts these as refused, not as quick answers (see overload.SHED).
    scopes: list[Scope] = []
    async with serving(targets_repo, scopes) as client:
        answers = await burst(client, "tight", 32)
    refused = sum(r.status_code == 503 for r in answers)
    assert refused > 0
    assert sum(SHED in scope for scope in scopes) == refused
