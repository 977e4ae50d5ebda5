"""API keys as a client and an operator meet them: 401, 403, scopes, models, reloads, leaks."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from security_support import TestKey, new_key
from starlette.testclient import TestClient

import server.telemetry
from server.config import Settings
from server.http.app import create_app
from server.http.auth import Need, requirement

X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": X[0].tolist()}]}
)

INFER = new_key("client", "infer")
ADMIN = new_key("ops", "admin")
METRICS = new_key("scraper", "metrics")
EVERYTHING = new_key("root", "infer", "admin", "metrics")
LINEAR_ONLY = new_key("team-linear", "infer", "metrics", "admin", models=("linear",))
KEYS = (INFER, ADMIN, METRICS, EVERYTHING, LINEAR_ONLY)

# Every route with the scope it needs; `None` = open. Model routes name `tree`.
ROUTES: list[tuple[str, str, str | None, bool]] = [
    # (method, path, scope, about every model)
    ("GET", "/v2/health/live", None, False),
    ("GET", "/v2/health/ready", None, False),
    ("GET", "/v2", "infer", False),
    ("GET", "/v2/", "infer", False),
    ("GET", "/v2/models", "infer", True),
    ("GET", "/v2/models/stats", "infer", True),
    ("POST", "/v2/repository/index", "admin", True),
    ("POST", "/v2/repository/models/tree/load", "admin", False),
    ("POST", "/v2/repository/models/tree/unload", "admin", False),
    ("GET", "/metrics", "metrics", True),
    ("GET", "/openapi.json", "any", False),
    # Traffic and approvals change what serves: admin.
    ("GET", "/v2/models/tree/traffic", "admin", False),
    ("PUT", "/v2/models/tree/traffic", "admin", False),
    ("POST", "/v2/models/tree/traffic/nothing", "admin", False),
    ("POST", "/v2/models/tree/versions/1/approve", "admin", False),
    ("GET", "/v2/models/tree/versions/1/approval", "admin", False),
]
for base in ("/v2/models/tree", "/v2/models/tree/versions/1"):
    ROUTES += [
        ("GET", base, "infer", False),
        ("GET", base + "/ready", "infer", False),
        ("GET", base + "/config", "infer", False),
        ("GET", base + "/stats", "infer", False),
        ("POST", base + "/infer", "infer", False),
        ("GET", base + "/drift", "metrics", False),
        ("POST", base + "/feedback", "admin", False),
    ]


def settings_with(repo: Path, **security: Any) -> Settings:
    return Settings(model_repository=repo, security=security, telemetry={"tracing": False})


@pytest.fixture(scope="module")
def client(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repo = tmp_path_factory.mktemp("auth") / "repo"
    shutil.copytree(tiny_repo, repo)  # admin calls may write beside the models
    settings = settings_with(repo, keys=[key.entry for key in KEYS])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    if path.endswith("/infer"):
        return client.post(path, content=BODY, headers=headers)
    if path.endswith("/feedback"):
        return client.post(path, json={"labels": []}, headers=headers)
    return client.request(method, path, headers=headers)


def test_every_route_of_the_app_is_in_the_scope_table() -> None:
    # The app's own OpenAPI document is built from its route table: every route is in it.
    doc = TestClient(create_app(Settings())).get("/openapi.json").json()
    served = {
        (
            method.upper(),
            path.replace("{name}", "tree").replace("{version}", "1").replace("{action}", "nothing"),
        )
        for path, item in doc["paths"].items()
        for method in item
    }
    listed = {(method, path) for method, path, _, _ in ROUTES}
    assert served == listed, "a new route needs a row in ROUTES (and a scope in auth.py)"
    for _, path, scope, _ in ROUTES:
        assert requirement(path).need is (Need.OPEN if scope is None else Need(scope))


@pytest.mark.parametrize(("method", "path", "scope", "every_model"), ROUTES)
@pytest.mark.parametrize("key", KEYS, ids=[k.id for k in KEYS])
def test_each_key_reaches_exactly_the_routes_of_its_scopes(
    client: TestClient, method: str, path: str, scope: str | None, every_model: bool, key: TestKey
) -> None:
    answer = call(client, method, path, key.bearer())
    denied = scope is not None and (
        scope not in (*key.scopes, "any")
        or (key.models is not None and (every_model or "tree" in path))
    )
    if denied:
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"].startswith(f"key '{key.id}'")
        assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
    else:
        assert answer.status_code not in (401, 403), answer.text
        assert answer.status_code < 500, answer.text
    if path.endswith("/unload") and answer.status_code == 200:
        assert client.post("/v2/repository/models/tree/load", headers=ADMIN.bearer()).is_success


@pytest.mark.parametrize(("method", "path", "scope", "every_model"), ROUTES)
def test_without_a_key_only_health_is_open(
    client: TestClient, method: str, path: str, scope: str | None, every_model: bool
) -> None:
    answer = call(client, method, path, {})
    if scope is None:
        assert answer.status_code == 200
        return
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer realm="sluice"'
    assert "API key is required" in answer.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk-test-not-a-real-key"},
        {"x-api-key": "sk-test-not-a-real-key"},
        {"Authorization": "Bearer " + "x" * 5000},
        {"Authorization": "Basic dXNlcjpwYXNz"},  # not a bearer token: no key sent
    ],
    ids=["bearer", "x-api-key", "huge", "basic"],
)
def test_a_bad_key_is_401_and_the_body_does_not_echo_it(
    client: TestClient, headers: dict[str, str]
) -> None:
    answer = client.post("/v2/models/tree/infer", content=BODY, headers=headers)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith('Bearer realm="sluice"')
    assert "sk-test" not in answer.text
    assert "xxxx" not in answer.text


def test_both_header_forms_carry_a_key(client: TestClient) -> None:
    for headers in (INFER.bearer(), INFER.header(), {"authorization": f"bearer {INFER.secret}"}):
        assert client.post("/v2/models/tree/infer", content=BODY, headers=headers).is_success


def test_a_model_limited_key_uses_its_model_and_no_other(client: TestClient) -> None:
    ok = client.post("/v2/models/linear/infer", content=BODY, headers=LINEAR_ONLY.header())
    other = client.post("/v2/models/tree/infer", content=BODY, headers=LINEAR_ONLY.header())
    assert ok.status_code == 200
    assert other.status_code == 403
    assert other.json()["error"] == "key 'team-linear' is not allowed to use model 'tree'"


def test_unknown_paths_need_a_key_before_they_are_404(client: TestClient) -> None:
    assert client.get("/admin/secret").status_code == 401
    assert client.get("/admin/secret", headers=METRICS.bearer()).status_code == 404


def test_an_untouched_model_action_needs_admin(client: TestClient) -> None:
    """A route added later under a model (traffic, approvals) fails closed."""
    assert requirement("/v2/models/tree/traffic").need is Need.ADMIN
    answer = client.post("/v2/models/tree/traffic", headers=INFER.bearer())
    assert answer.status_code == 403


def test_keys_file_reload_adds_and_revokes_keys(tiny_repo: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    first, second = new_key("first", "infer"), new_key("second", "infer")

    def write(*keys: TestKey) -> None:
        staged = tmp_path / "keys.yaml.new"
        staged.write_text(yaml.safe_dump({"keys": [k.entry for k in keys]}))
        os.replace(staged, keys_file)  # as an operator's tooling should: atomically

    write(first)
    settings = settings_with(tiny_repo, keys_file=str(keys_file), keys_reload_s=0)
    app = create_app(settings)

    def status(key: TestKey) -> int:
        return client.post("/v2/models/tree/infer", content=BODY, headers=key.bearer()).status_code

    def eventually(key: TestKey, expected: int) -> None:
        for _ in range(200):  # the reload runs in a thread; each request gives it a turn
            if status(key) == expected:
                return
        pytest.fail(f"key {key.id} still answered {status(key)}, expected {expected}")

    with TestClient(app) as client:
        assert status(first) == 200
        assert status(second) == 401
        write(second)
        eventually(second, 200)
        eventually(first, 401)
        keys_file.write_text("keys: [{id: broken")  # a bad edit keeps the keys in force
        for _ in range(20):
            assert status(second) == 200


def test_a_bad_keys_file_stops_start_up_with_its_name(tiny_repo: Path, tmp_path: Path) -> None:
    from server.config import ConfigError

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"id": "x", "sha256": "sk-test-oops"}]}))
    with pytest.raises(ConfigError) as raised:
        create_app(settings_with(tiny_repo, keys_file=str(keys_file)))
    assert str(keys_file) in str(raised.value)
    assert "sk-test-oops" not in str(raised.value), "a misplaced key is not echoed"


def test_no_key_leaks_into_logs_metrics_traces_or_answers(
    tiny_repo: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exported = InMemorySpanExporter()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    # The console exporter, swapped for one the test can read (spans as the SDK exports them).
    monkeypatch.setattr(server.telemetry, "ConsoleSpanExporter", lambda: exported)
    wrong = "sk-test-wrong-" + "q" * 20
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)  # admin calls may write beside the models
    settings = Settings(
        model_repository=repo,
        log_level="debug",
        security={"keys": [key.entry for key in KEYS], "rate_limit": "1000/second"},
        telemetry={"tracing": True, "prometheus": True},
    )
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as client:
        for key in KEYS:
            for method, path, _, _ in ROUTES:
                if path.endswith("/unload"):
                    continue
                for headers in (key.bearer(), key.header(), {"x-api-key": wrong}):
                    answer = call(client, method, path, headers)
                    seen += [answer.text, str(answer.headers)]
        metrics = client.get("/metrics", headers=METRICS.bearer())
    assert metrics.status_code == 200
    assert "http_server_request_duration" in metrics.text
    traces = "\n".join(span.to_json() for span in exported.get_finished_spans())
    assert "/v2/models/{name}/infer" in traces, "spans were exported"
    logs = "\n".join(record.getMessage() for record in caplog.records)
    for text in (*seen, metrics.text, traces, logs):
        for secret in (*(key.secret for key in KEYS), wrong):
            assert secret not in text
        for key in KEYS:
            assert key.entry["sha256"] not in text
