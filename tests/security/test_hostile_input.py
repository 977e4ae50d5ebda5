"""Hostile input, by hand: every refusal is a 4xx whose ``{"error": ...}`` names the problem.

In process (ASGI with lifespan), over both ways the infer routes are served.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from server.config import Settings
from server.core.monitoring.feedback import MAX_VALUES_PER_CALL, parse_labels
from server.errors import InvalidInput
from server.http.app import create_app

LIMIT = 1024 * 1024
X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)


def tensor(**fields: Any) -> dict[str, Any]:
    doc = {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": X[0].tolist()}
    doc.update(fields)
    return doc


def infer(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs) or [tensor()], **extra})


def binary(shape: list[int], size: int, payload: bytes) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {"inputs": [tensor(shape=shape, data=None, parameters={"binary_data_size": size})]}
    ).replace(b',"data":null', b"")
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "starlette-route"])
def client(tiny_repo: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    settings = Settings(
        model_repository=tiny_repo,
        max_request_bytes=LIMIT,
        http_fast_path=request.param,
        limits={"decode_in_thread_bytes": 4096},  # the off-loop decode is exercised too
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def refused(answer: Any, status: int, *words: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    message = answer.json()["error"]
    for word in words:
        assert word in message, message


INFER = "/v2/models/tree/infer"
TWO = "%C2%B2"  # '²': str.isdigit() says yes, int() says no
ARABIC_ONE = "%D9%A1"  # int() reads it as 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/tree/versions/{v}/infer"),
        ("GET", "/v2/models/tree/versions/{v}"),
        ("GET", "/v2/models/tree/versions/{v}/ready"),
        ("GET", "/v2/models/tree/versions/{v}/config"),
        ("GET", "/v2/models/tree/versions/{v}/stats"),
        ("GET", "/v2/models/tree/versions/{v}/drift"),
        ("POST", "/v2/models/tree/versions/{v}/feedback"),
    ],
)
@pytest.mark.parametrize("version", [TWO, ARABIC_ONE, "01", "1" * 5000, "-1", "1.0"])
def test_a_version_that_is_not_canonical_is_400_on_every_route(
    client: TestClient, method: str, path: str, version: str
) -> None:
    answer = client.request(method, path.format(v=version), content=infer())
    refused(answer, 400, "version must be a whole number in ASCII digits")
    assert len(answer.text) < 300, "an absurd version is not echoed in full"


def test_the_canonical_version_is_served(client: TestClient) -> None:
    assert client.post("/v2/models/tree/versions/1/infer", content=infer()).status_code == 200
    refused(client.get("/v2/models/tree/versions/0"), 404, "version 0 is not found")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("m" * 5000, ("5000 bytes long",)),
        ("%2E%2E", ("not a folder name",)),
        ("a%5Cb", ("not a folder name",)),
        ("a%00b", ("not a folder name",)),
    ],
    ids=["5000-chars", "dot-dot", "backslash", "nul"],
)
@pytest.mark.parametrize("action", ["load", "unload"])
def test_absurd_names_on_load_and_unload_are_400(
    client: TestClient, name: str, words: tuple[str, ...], action: str
) -> None:
    refused(client.post(f"/v2/repository/models/{name}/{action}"), 400, *words)


def test_absurd_names_elsewhere_are_404(client: TestClient) -> None:
    refused(client.post(f"/v2/models/{'m' * 5000}/infer", content=infer()), 404, "unknown model")
    refused(client.get("/v2/models/%FF%FE"), 404, "unknown model")


CASES: list[tuple[str, bytes, dict[str, str], int, tuple[str, ...]]] = [
    ("malformed JSON", b'{"inputs": [', {}, 400, ("not valid JSON",)),
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, {}, 400, ("not valid JSON",)),
    ("deeply nested data", infer(tensor(data=[[[[[[[[[[[[1.0]]]]]]]]]]]])), {}, 400,
     ("features",)),
    ("NaN literal", b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], '
     b'"data": [NaN, 1, 2, 3]}]}', {}, 400, ("not valid JSON",)),
    ("Infinity literal", b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], '
     b'"data": [Infinity, 1, 2, 3]}]}', {}, 400, ("not valid JSON",)),
    ("non-UTF-8 body", b'{"inputs": "\xff\xfe"}', {}, 400, ("not valid JSON",)),
    ("wrong datatype", infer(tensor(datatype="FP64")), {}, 400, ("features", "FP64")),
    ("unknown datatype", infer(tensor(datatype="FLOAT")), {}, 400, ("features",)),
    ("numeric strings as FP32", infer(tensor(data=["1.5", "2", "3", "4"])), {}, 400,
     ("input 'features'", "not strings or booleans")),
    ("booleans as FP32", infer(tensor(data=[True, False, True, False])), {}, 400,
     ("input 'features'", "not strings or booleans")),
    ("a boolean among FP32 numbers", infer(tensor(data=[1.5, True, 2.0, 3.0])), {}, 400,
     ("input 'features'", "not strings or booleans")),
    ("shape and data disagree", infer(tensor(shape=[2, 4])), {}, 400, ("needs 8",)),
    ("gigabyte shape", infer(tensor(shape=[100_000, 100_000])), {}, 400, ("features",)),
    ("65 dimensions", infer(tensor(shape=[1] * 65, data=[1.0])), {}, 400,
     ("65 dimensions", "at most 32")),
    ("negative dimension", infer(tensor(shape=[-1, 4])), {}, 400, ("non-negative",)),
    ("boolean dimension", infer(tensor(shape=[True, 4])), {}, 400, ("non-negative",)),
    ("megabyte request id", infer(id="i" * 1_000_000), {}, 400, ("'id' has 1000000 characters",)),
    ("long request id", infer(id="i" * 300), {}, 400, ("'id' has 300 characters", "256")),
    ("numeric request id", infer(id=7), {}, 400, ("'id' must be a string",)),
    ("header length past the body", infer(), {"Inference-Header-Content-Length": "99999"}, 400,
     ("outside the body",)),
    ("negative header length", infer(), {"Inference-Header-Content-Length": "-5"}, 400,
     ("outside the body",)),
    ("header length not a number", infer(), {"Inference-Header-Content-Length": "1e3"}, 400,
     ("must be an integer",)),
    ("gzip of garbage", b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"}, 400,
     ("not valid gzip",)),
    ("unknown encoding", infer(), {"Content-Encoding": "br"}, 400, ("Content-Encoding",)),
    ("deadline header not a number", infer(), {"x-request-timeout-ms": "soon"}, 400,
     ("x-request-timeout-ms",)),
    ("deadline header negative", infer(), {"x-request-timeout-ms": "-5"}, 400,
     ("x-request-timeout-ms",)),
    ("deadline already gone", infer(), {"x-request-timeout-ms": "1e-9"}, 504,
     ("deadline", "passed before compute")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hostile_infer_bodies_are_refused_with_a_reason(
    client: TestClient, body: bytes, headers: dict[str, str], status: int, words: tuple[str, ...]
) -> None:
    refused(client.post(INFER, content=body, headers=headers), status, *words)


@pytest.mark.parametrize(
    ("shape", "size", "payload", "words"),
    [
        ([1, 4], 16, b"\0" * 8, ("runs past the end",)),
        ([1, 4], 8, b"\0" * 8, ("needs 16",)),
        ([1_000_000_000, 4], 16, b"\0" * 16, ("needs 16000000000",)),
        ([1, 4], 16, b"\0" * 32, ("16 bytes of binary data were not claimed",)),
    ],
    ids=["size-past-end", "size-too-small", "gigabyte-shape", "unclaimed-bytes"],
)
def test_binary_lengths_that_lie_are_400(
    client: TestClient, shape: list[int], size: int, payload: bytes, words: tuple[str, ...]
) -> None:
    body, headers = binary(shape, size, payload)
    refused(client.post(INFER, content=body, headers=headers), 400, *words)


def test_a_gzip_bomb_is_stopped_at_the_size_limit(client: TestClient) -> None:
    bomb = gzip.compress(b"\0" * (256 * 1024 * 1024), compresslevel=9)  # 256 MiB in ~250 KiB
    assert len(bomb) < LIMIT
    answer = client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    refused(answer, 400, f"decompressed request body exceeds {LIMIT} bytes")


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(client: TestClient) -> None:
    answer = client.post(INFER, content=b"{}", headers={"Content-Length": str(LIMIT * 100)})
    assert answer.status_code == 413


def test_null_is_a_missing_value_and_refused_where_the_model_needs_finite(
    client: TestClient,
) -> None:
    refused(client.post(INFER, content=infer(tensor(data=[1, None, 3, 4]))), 400, "feature 'f1'")


def test_a_body_decoded_off_the_loop_gives_the_same_answer(client: TestClient) -> None:
    rows = np.random.default_rng(3).normal(size=(2000, 4)).astype(np.float32)
    nested = infer(tensor(shape=[2000, 4], data=rows.tolist()))
    flat = infer(tensor(shape=[2000, 4], data=rows.reshape(-1).tolist()))
    assert len(nested) > 4096, "over the decode_in_thread_bytes of this fixture"
    a, b = client.post(INFER, content=nested), client.post(INFER, content=flat)
    assert a.status_code == b.status_code == 200
    assert a.json()["outputs"] == b.json()["outputs"]


def test_a_generous_deadline_header_is_served(client: TestClient) -> None:
    answer = client.post(INFER, content=infer(), headers={"x-request-timeout-ms": "60000"})
    assert answer.status_code == 200


def test_the_envoy_deadline_header_is_honoured(client: TestClient) -> None:
    late = client.post(INFER, content=infer(), headers={"x-envoy-expected-rq-timeout-ms": "1e-9"})
    refused(late, 504, "passed before compute")


FEEDBACK = "/v2/models/tree/feedback"


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"id": "i" * 300, "label": 1}, ("feedback: 'id' has 300 characters", "at most 256")),
        (
            {"labels": [{"id": "a", "label": 1}, {"id": "i" * 1_000_000, "label": 0}]},
            ("labels[1]: 'id' has 1000000 characters",),
        ),
        (
            {"labels": [{"id": f"r{i}", "label": 1} for i in range(10_001)]},
            ("10001 labels", "at most 10000 per call"),
        ),
    ],
    ids=["long-id", "megabyte-id-in-a-list", "too-many-labels"],
)
def test_absurd_feedback_is_400_naming_the_field(
    client: TestClient, doc: dict[str, Any], words: tuple[str, ...]
) -> None:
    answer = client.post(FEEDBACK, content=orjson.dumps(doc))
    refused(answer, 400, *words)
    assert len(answer.text) < 300, "the id is not echoed back"


def test_feedback_values_are_bounded_per_call() -> None:
    one = [0] * (MAX_VALUES_PER_CALL // 2 + 1)
    with pytest.raises(InvalidInput, match=r"labels\[0\.\.1\] hold 1000002 values"):
        parse_labels({"labels": [{"id": "a", "label": one}, {"id": "b", "label": one}]})
    with pytest.raises(InvalidInput, match=r"feedback: 'label' has 1000001 values"):
        parse_labels({"id": "a", "label": [0] * (MAX_VALUES_PER_CALL + 1)})
