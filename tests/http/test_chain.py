"""The ASGI chain: a layer added to it sees every request, the hot infer routes included."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from asgi_support import lifespan
from opentelemetry import trace
from starlette.responses import Response
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.http.app import create_app

X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": X[0].tolist()}]}
)


@dataclass
class Seen:
    """What a recording layer saw of one request."""

    method: str
    path: str
    status: int
    via_router: bool  # Starlette's router handled it (it marks the scope)
    span: Any = None


@dataclass
class Recorder:
    """An access-slot layer, as authentication or rate limiting will be."""

    seen: list[Seen] = field(default_factory=list)
    refuse_without: str | None = None  # answer 401 unless this header is sent
    explode_on: str | None = None  # raise on this path, as a buggy layer would

    def layer(self, app: ASGIApp) -> ASGIApp:
        async def record(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if scope["path"] == self.explode_on:
                raise RuntimeError("layer bug")
            status = 0

            async def capture(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            span = trace.get_current_span()
            headers = {k.decode(): v for k, v in scope["headers"]}
            if self.refuse_without is not None and self.refuse_without not in headers:
                response = Response(b'{"error": "unauthorized"}', 401)
                await response(scope, receive, capture)
            else:
                await app(scope, receive, capture)
            self.seen.append(Seen(scope["method"], scope["path"], status, "router" in scope, span))

        return record


def client_for(repo: Path, recorder: Recorder, **overrides: Any) -> TestClient:
    settings = Settings(model_repository=repo, **overrides)
    return TestClient(create_app(settings, access=[recorder.layer]))


@pytest.fixture(params=[True, False], ids=["fast-path", "starlette-route"])
def fast(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_an_added_layer_sees_infer_on_both_paths(tiny_repo: Path, fast: bool) -> None:
    recorder = Recorder()
    with client_for(tiny_repo, recorder, http_fast_path=fast) as client:
        for path in ("/v2/models/tree/infer", "/v2/models/tree/versions/1/infer"):
            assert client.post(path, content=BODY).status_code == 200
        assert client.post("/v2/models/nope/infer", content=BODY).status_code == 404
        assert client.get("/v2/models/tree").status_code == 200
    infers = [s for s in recorder.seen if s.path.endswith("/infer")]
    assert [(s.path, s.status) for s in infers] == [
        ("/v2/models/tree/infer", 200),
        ("/v2/models/tree/versions/1/infer", 200),
        ("/v2/models/nope/infer", 404),
    ]
    # The fast path really answered: Starlette's router never saw the infer requests.
    assert {s.via_router for s in infers} == {not fast}
    assert recorder.seen[-1].via_router, "everything else goes through the router"


def test_a_refusing_layer_guards_the_fast_path_too(tiny_repo: Path, fast: bool) -> None:
    recorder = Recorder(refuse_without="x-api-key")
    with client_for(tiny_repo, recorder, http_fast_path=fast) as client:
        refused = client.post("/v2/models/tree/infer", content=BODY)
        allowed = client.post("/v2/models/tree/infer", content=BODY, headers={"x-api-key": "k"})
        stats = client.get("/v2/models/tree/stats", headers={"x-api-key": "k"}).json()
    assert refused.status_code == 401
    assert allowed.status_code == 200
    [v1, v2] = stats["model_stats"]
    assert v1["inference_count"] + v2["inference_count"] == 1, "the refused request never ran"


def test_tracing_covers_the_fast_path(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    recorder = Recorder()
    telemetry = {"tracing": True, "prometheus": False}
    with client_for(tiny_repo, recorder, http_fast_path=fast, telemetry=telemetry) as client:
        answer = client.post(
            "/v2/models/tree/infer",
            content=BODY,
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
    assert answer.status_code == 200
    [seen] = recorder.seen
    assert seen.via_router is (not fast)
    span = seen.span
    assert span.is_recording() is False, "the request span has ended"
    assert span.name == "POST /v2/models/{name}/infer"
    assert format(span.get_span_context().trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"


def test_a_failing_layer_gets_a_json_500_logged_once(
    tiny_repo: Path, caplog: pytest.LogCaptureFixture, fast: bool
) -> None:
    recorder = Recorder(explode_on="/v2/models/tree/infer")
    with (
        caplog.at_level(logging.ERROR, logger="sluice.http"),
        client_for(tiny_repo, recorder, http_fast_path=fast) as client,
    ):
        response = client.post("/v2/models/tree/infer", content=BODY)
        after = client.post("/v2/models/tree/versions/2/infer", content=BODY)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError"}
    assert "Traceback" not in response.text
    assert after.status_code == 200, "the server goes on serving"
    logged = [r for r in caplog.records if r.name == "sluice.http" and r.exc_info]
    assert len(logged) == 1


def test_an_error_inside_a_starlette_route_is_answered_once(
    tiny_repo: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.http import presenters

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("renderer bug")

    monkeypatch.setattr(presenters, "model_config", broken)
    with (
        caplog.at_level(logging.ERROR, logger="sluice.http"),
        TestClient(create_app(Settings(model_repository=tiny_repo))) as client,
    ):
        response = client.get("/v2/models/tree/config")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: KeyError"}
    logged = [r for r in caplog.records if r.name == "sluice.http" and r.exc_info]
    assert len(logged) == 1


async def test_an_answered_request_leaves_no_reference_cycles(tiny_repo: Path, fast: bool) -> None:
    """Garbage the collector must find costs pauses under load (p99); refcounting frees all."""
    app = create_app(Settings(model_repository=tiny_repo, http_fast_path=fast))
    statuses: list[int] = []

    async def call() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v2/models/tree/infer",
            "raw_path": b"/v2/models/tree/infer",
            "query_string": b"",
            "headers": [(b"content-length", str(len(BODY)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)

    async with lifespan(app):
        for _ in range(50):  # warm every lazily built cache
            await call()
        gc.collect()
        gc.disable()
        try:
            for _ in range(200):
                await call()
            found = gc.collect()
        finally:
            gc.enable()
    assert set(statuses) == {200}
    assert found == 0
