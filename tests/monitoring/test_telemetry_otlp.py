"""Metrics and traces pushed over OTLP/HTTP reach a receiver, with the right resource.

No collector binary here: the receiver is a small HTTP server decoding the
official ``opentelemetry-proto`` messages.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from monitoring_support import (
    MODEL,
    Server,
    build_credit,
    infer_body,
    sample,
    start_server,
    wait_until,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from server import __version__

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``credit`` version 1 with reference.json and card.yaml. Read-only for tests."""
    return build_credit(tmp_path_factory.mktemp("credit"))


class Receiver:
    """Collects every export request; thread-safe."""

    def __init__(self) -> None:
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.traces: list[ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def snapshot(self) -> tuple[list[ExportMetricsServiceRequest], list[ExportTraceServiceRequest]]:
        with self.lock:
            return list(self.metrics), list(self.traces)


def handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            reply: Any
            if self.path == "/v1/metrics":
                request: Any = ExportMetricsServiceRequest.FromString(body)
                reply = ExportMetricsServiceResponse()
                with receiver.lock:
                    receiver.metrics.append(request)
            elif self.path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                reply = ExportTraceServiceResponse()
                with receiver.lock:
                    receiver.traces.append(request)
            else:
                self.send_error(404)
                return
            payload = reply.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    collected = Receiver()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(collected))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield collected, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def server(
    credit_repo: Path, receiver: tuple[Receiver, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver[1],
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "credit-scoring",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        "SLUICE_TELEMETRY__TRACING": "true",
        "SLUICE_TELEMETRY__PROMETHEUS": "false",
    }
    running = start_server(credit_repo, tmp_path_factory.mktemp("log") / "server.log", env)
    yield running
    running.stop()


def attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        assert isinstance(kv, KeyValue)
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return out


def send(server: Server, requests: int) -> None:
    x = sample(requests, seed=7)
    with httpx.Client(base_url=server.url, timeout=30) as client:

        def post(i: int) -> None:
            headers = {}
            if i == 0:
                headers["traceparent"] = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
            response = client.post(
                f"/v2/models/{MODEL}/infer", json=infer_body(x[i : i + 1]), headers=headers
            )
            assert response.status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, range(requests)))


def test_metrics_arrive_with_the_resource(server: Server, receiver: tuple[Receiver, str]) -> None:
    collected, _ = receiver
    send(server, 10)

    def exported() -> dict[str, Any] | None:
        for request in reversed(collected.snapshot()[0]):
            for rm in request.resource_metrics:
                names = {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
                success = names.get("ml.inference.request.success")
                if success is None or "http.server.request.duration" not in names:
                    continue
                counts = [p.as_int or p.as_double for p in success.sum.data_points]
                if sum(counts) >= 10:
                    return {"resource": attributes(rm.resource.attributes), "metrics": names}
        return None

    found = wait_until(exported, "metrics over OTLP")
    resource = found["resource"]
    assert resource["service.name"] == "credit-scoring"
    assert resource["service.version"] == __version__
    assert resource["deployment.environment.name"] == "test"
    duration = found["metrics"]["http.server.request.duration"]
    assert duration.unit == "s"
    points = duration.histogram.data_points
    routes = {attributes(p.attributes).get("http.route") for p in points}
    assert "/v2/models/{name}/infer" in routes
    assert 0.0005 in points[0].explicit_bounds
    success = found["metrics"]["ml.inference.request.success"]
    assert success.sum.is_monotonic
    assert attributes(success.sum.data_points[0].attributes) == {"model": MODEL, "version": "1"}


def test_request_and_batch_spans_are_linked(server: Server, receiver: tuple[Receiver, str]) -> None:
    collected, _ = receiver
    send(server, 12)

    def spans() -> tuple[list[Span], list[Span], dict[str, Any]] | None:
        request_spans: list[Span] = []
        batch_spans: list[Span] = []
        resource: dict[str, Any] = {}
        for request in collected.snapshot()[1]:
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        if span.kind == Span.SPAN_KIND_SERVER and span.name.endswith("/infer"):
                            request_spans.append(span)
                        elif span.name == f"execute {MODEL}":
                            batch_spans.append(span)
        linked = {link.span_id for span in batch_spans for link in span.links}
        if len(request_spans) >= 12 and all(s.span_id in linked for s in request_spans):
            return request_spans, batch_spans, resource
        return None

    request_spans, batch_spans, resource = wait_until(spans, "linked spans over OTLP")
    assert resource["service.name"] == "credit-scoring"
    assert resource["service.version"] == __version__
    span = request_spans[0]
    assert span.name == "POST /v2/models/{name}/infer"
    server_attributes = attributes(span.attributes)
    assert server_attributes["http.route"] == "/v2/models/{name}/infer"
    assert server_attributes["http.response.status_code"] == 200
    assert server_attributes["http.request.method"] == "POST"
    # The client's traceparent continues into the server span.
    assert TRACE_ID in {s.trace_id.hex() for s in request_spans}
    batch = batch_spans[0]
    batch_attributes = attributes(batch.attributes)
    assert batch_attributes["ml.model.name"] == MODEL
    assert batch_attributes["ml.batch.rows"] >= 1
    assert len(batch.links) == batch_attributes["ml.batch.requests"]
