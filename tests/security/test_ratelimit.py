"""Rate limits: 429 with Retry-After per key or per address, shared through Redis, and a
Redis outage that never fails a request."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import free_port
from security_support import new_key, serve
from starlette.testclient import TestClient

from server.config import Settings
from server.http.access import forwarded_headers
from server.http.app import create_app
from server.http.ratelimit import LocalWindows, client_identity

BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.5] * 4}]}
)
INFER = "/v2/models/tree/infer"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def app_for(repo: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(model_repository=repo, **settings)))


def test_a_key_over_its_rate_gets_429_with_retry_after(tiny_repo: Path) -> None:
    slow, fast = new_key("slow", "infer", rate_limit="3/minute"), new_key("fast", "infer")
    security = {"keys": [slow.entry, fast.entry], "rate_limit": "100/minute"}
    with app_for(tiny_repo, security=security) as client:
        answers = [client.post(INFER, content=BODY, headers=slow.bearer()) for _ in range(4)]
        other = client.post(INFER, content=BODY, headers=fast.bearer())
        probes = [client.get("/v2/health/ready") for _ in range(10)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    # A sliding window gives the budget back gradually: at most two periods away.
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert refused.json()["error"].startswith(
        "rate limit of 3 requests per 60 s exceeded for key 'slow'"
    )
    assert other.status_code == 200, "each key has its own budget"
    assert {p.status_code for p in probes} == {200}, "health probes are never rate limited"


def test_without_keys_the_limit_is_per_client_address(tiny_repo: Path) -> None:
    with app_for(tiny_repo, security={"rate_limit": "2/minute"}) as client:
        codes = [client.post(INFER, content=BODY).status_code for _ in range(3)]
        refused = client.get("/v2/models/tree")
    assert codes == [200, 200, 429]
    assert refused.status_code == 429
    assert "this client address" in refused.json()["error"]


def test_no_rate_configured_means_no_limit(tiny_repo: Path) -> None:
    with app_for(tiny_repo) as client:
        assert {client.post(INFER, content=BODY).status_code for _ in range(50)} == {200}


def test_the_window_slides_and_retry_after_is_honest() -> None:
    clock = FakeClock()
    windows = LocalWindows(clock=clock)
    rate = (10, 1.0)
    assert all(windows.hit("k", rate) == 0 for _ in range(10))
    wait = windows.hit("k", rate)
    assert wait > 0
    clock.now += wait
    assert windows.hit("k", rate) == 0, "after the wait it said, a request goes through"
    clock.now += 0.0001
    assert windows.hit("k", rate) > 0, "and only one"
    clock.now += 10.0  # both windows are long gone
    assert all(windows.hit("k", rate) == 0 for _ in range(10))


def test_half_a_window_later_half_the_budget_is_back() -> None:
    clock = FakeClock()  # 1000.0: the start of a window
    windows = LocalWindows(clock=clock)
    rate = (10, 1.0)
    for _ in range(10):
        windows.hit("k", rate)
    clock.now += 1.5  # the previous window is half out of view: 5 of its 10 still count
    allowed = 0
    while windows.hit("k", rate) == 0:
        allowed += 1
    assert allowed == 5


def test_memory_stays_bounded_under_a_flood_of_identities() -> None:
    windows = LocalWindows(capacity=1000, clock=FakeClock())
    for i in range(100_000):
        windows.hit(f"ip:{i}", (5, 60.0))
    assert len(windows) <= 1000


def test_ipv6_clients_are_counted_by_their_slash_64() -> None:
    a = client_identity(("2001:db8:1:2:aaaa::1", 5000))
    b = client_identity(("2001:db8:1:2:bbbb::9", 5001))
    assert a == b == "2001:db8:1:2::/64"
    assert client_identity(("192.0.2.7", 1)) == "192.0.2.7"


def test_replicas_share_one_budget_through_redis(tiny_repo: Path, redis_server: Any) -> None:
    key = new_key("shared", "infer", rate_limit="4/minute")
    settings = {"security": {"keys": [key.entry]}, "redis": {"url": redis_server.url}}
    with app_for(tiny_repo, **settings) as one, app_for(tiny_repo, **settings) as two:
        codes = [
            one.post(INFER, content=BODY, headers=key.bearer()).status_code,
            two.post(INFER, content=BODY, headers=key.bearer()).status_code,
            one.post(INFER, content=BODY, headers=key.bearer()).status_code,
            two.post(INFER, content=BODY, headers=key.bearer()).status_code,
        ]
        refused = [
            one.post(INFER, content=BODY, headers=key.bearer()),
            two.post(INFER, content=BODY, headers=key.bearer()),
        ]
    assert codes == [200] * 4
    assert [r.status_code for r in refused] == [429, 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)


def test_a_redis_outage_limits_locally_and_never_fails_a_request(
    tiny_repo: Path, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key("k", "infer", rate_limit="5/minute")
    scraper = new_key("scraper", "metrics")
    settings = {
        "security": {"keys": [key.entry, scraper.entry]},
        "redis": {"url": redis_server.url, "retry_after_s": 60},
    }
    with caplog.at_level(logging.WARNING, "sluice.security"), app_for(tiny_repo, **settings) as c:
        assert c.post(INFER, content=BODY, headers=key.bearer()).status_code == 200
        redis_server.stop()  # mid-run
        codes = [c.post(INFER, content=BODY, headers=key.bearer()).status_code for _ in range(6)]
        metrics = c.get("/metrics", headers=scraper.bearer()).text
    # One request went through Redis; in this process, five more fit the local window.
    assert codes == [200, 200, 200, 200, 200, 429]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "sluice.security" and "Redis unavailable" in r.getMessage()
    ]
    assert len(warnings) == 1, "logged once per outage"
    assert redis_server.url not in warnings[0]
    assert _counter(metrics, "http_server_rate_limit_store_errors") >= 1
    assert _counter(metrics, "http_server_rate_limit_local_decisions") >= 6
    assert _counter(metrics, "http_server_rate_limit_refused") == 1


def test_redis_that_never_answered_still_serves(tiny_repo: Path) -> None:
    settings = {
        "security": {"rate_limit": "3/minute"},
        "redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 200},
    }
    with app_for(tiny_repo, **settings) as client:
        codes = [client.post(INFER, content=BODY).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def test_a_rate_is_validated_at_start_up() -> None:
    from server.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"invalid setting 'security\.rate_limit'"):
        load_settings(environ={"SLUICE_SECURITY__RATE_LIMIT": "lots"})


def test_behind_a_local_proxy_each_forwarded_client_has_its_own_budget(
    tiny_repo: Path, tmp_path: Path
) -> None:
    served = serve(
        tiny_repo, tmp_path / "server.log", env={"SLUICE_SECURITY__RATE_LIMIT": "2/minute"}
    )
    try:
        with httpx.Client(base_url=served.url, timeout=30) as client:

            def post(address: str) -> int:
                headers = {"X-Forwarded-For": address}
                return client.post(INFER, content=BODY, headers=headers).status_code

            first = [post("198.51.100.1") for _ in range(3)]
            second = [post("198.51.100.2") for _ in range(2)]
    finally:
        served.stop()
    assert first == [200, 200, 429]
    assert second == [200, 200], "the proxy (127.0.0.1, trusted by default) names the client"


def test_proxy_headers_are_read_only_when_something_needs_the_client_address() -> None:
    assert not forwarded_headers(Settings(), environ={})
    assert forwarded_headers(Settings(security={"rate_limit": "5/second"}), environ={})
    assert forwarded_headers(Settings(), environ={"FORWARDED_ALLOW_IPS": "10.0.0.1"})
