"""Open Inference Protocol conformance, in process (ASGI with lifespan)."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from server.config import Settings
from server.http.app import create_app

X = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.2, -0.3, 0.0]], dtype=np.float32)


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "starlette-route"])
def client(tiny_repo: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """Every check runs against both ways the infer routes can be served."""
    settings = Settings(
        model_repository=tiny_repo, max_request_bytes=64 * 1024, http_fast_path=request.param
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def infer_body(data: Any = None, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "features", "datatype": "FP32", "shape": [2, 4]}
    tensor["data"] = X.reshape(-1).tolist() if data is None else data
    return {"inputs": [tensor], **extra}


def binary_request(arr: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": arr.nbytes},
                }
            ],
            **extra,
        }
    )
    return header + arr.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def split_binary(response: Any) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers["inference-header-content-length"])
    return orjson.loads(response.content[:length]), response.content[length:]


# -- server and health --------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_server_metadata(client: TestClient, path: str) -> None:
    doc = client.get(path).json()
    assert doc["name"] == "sluice"
    assert doc["version"]
    assert {"binary_tensor_data", "model_repository", "statistics"} <= set(doc["extensions"])


def test_health(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/tree/ready", "/v2/models/tree/versions/1/ready"])
def test_model_ready(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_model_metadata_uses_batch_dim_and_string_versions(client: TestClient) -> None:
    doc = client.get("/v2/models/linear").json()
    assert doc["versions"] == ["1", "2"]
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    versioned = client.get("/v2/models/linear/versions/1").json()
    assert versioned["versions"] == ["1"]
    assert len(versioned["properties"]["sha256"]) == 64


def test_model_config_is_triton_shaped(client: TestClient) -> None:
    doc = client.get("/v2/models/tree/config").json()
    assert doc["max_batch_size"] == 32
    assert doc["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}]
    assert doc["output"][0]["name"] == "probability"
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 2000


# -- inference ----------------------------------------------------------------


def test_infer_json_flat_and_nested_agree(client: TestClient) -> None:
    flat = client.post("/v2/models/linear/infer", json=infer_body())
    nested = client.post("/v2/models/linear/infer", json=infer_body(X.tolist()))
    assert flat.status_code == nested.status_code == 200
    assert flat.json()["outputs"] == nested.json()["outputs"]
    doc = flat.json()
    assert doc["model_name"] == "linear"
    assert doc["model_version"] == "2"
    probabilities = next(o for o in doc["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [2, 2]
    assert len(probabilities["data"]) == 4
    assert "parameters" not in probabilities, "JSON outputs carry no parameters (perf_analyzer)"


def test_infer_echoes_id_and_ignores_unknown_parameters(client: TestClient) -> None:
    body = infer_body(id="req-7", parameters={"whatever": 1, "custom": "x"})
    response = client.post("/v2/models/tree/versions/1/infer", json=body)
    assert response.status_code == 200
    assert response.json()["id"] == "req-7"
    assert response.json()["model_version"] == "1"


def test_requests_without_an_id_get_distinct_ids(client: TestClient) -> None:
    ids = [client.post("/v2/models/tree/infer", json=infer_body()).json()["id"] for _ in range(3)]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 3, "feedback must be able to name each request"


def test_infer_output_filtering(client: TestClient) -> None:
    body = infer_body(outputs=[{"name": "label"}])
    doc = client.post("/v2/models/linear/infer", json=body).json()
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    assert doc["outputs"][0]["datatype"] == "INT64"


def test_infer_binary_both_ways_without_content_type(client: TestClient) -> None:
    body, headers = binary_request(X, parameters={"binary_data_output": True})
    response = client.post("/v2/models/linear/infer", content=body, headers=headers)
    assert response.status_code == 200
    header, blob = split_binary(response)
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sum(sizes) == len(blob)
    assert len(response.content) == int(response.headers["content-length"])
    label = np.frombuffer(blob[: sizes[0]], dtype="<i8")
    probabilities = np.frombuffer(blob[sizes[0] :], dtype="<f4").reshape(2, 2)
    as_json = client.post("/v2/models/linear/infer", json=infer_body()).json()["outputs"]
    np.testing.assert_array_equal(label, as_json[0]["data"])
    np.testing.assert_allclose(probabilities.reshape(-1), as_json[1]["data"], rtol=1e-6)


def test_per_output_binary_flag_wins(client: TestClient) -> None:
    body, headers = binary_request(
        X,
        parameters={"binary_data_output": True},
        outputs=[
            {"name": "label", "parameters": {"binary_data": False}},
            {"name": "probabilities"},
        ],
    )
    response = client.post("/v2/models/linear/infer", content=body, headers=headers)
    header, blob = split_binary(response)
    assert "data" in header["outputs"][0]
    assert header["outputs"][1]["parameters"]["binary_data_size"] == len(blob) == 16


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies(client: TestClient, encoding: str) -> None:
    raw = orjson.dumps(infer_body())
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    response = client.post(
        "/v2/models/tree/infer", content=packed, headers={"Content-Encoding": encoding}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_large_answers_are_compressed_when_the_client_accepts_it(
    client: TestClient, encoding: str
) -> None:
    x = np.random.default_rng(2).normal(size=(600, 4)).astype(np.float32)
    body = infer_body(x.reshape(-1).tolist())
    body["inputs"][0]["shape"] = [600, 4]
    plain = client.post("/v2/models/tree/infer", json=body, headers={"Accept-Encoding": "identity"})
    packed = client.post("/v2/models/tree/infer", json=body, headers={"Accept-Encoding": encoding})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == encoding
    # httpx undoes the encoding; the answer is the same rows either way
    assert packed.json()["outputs"] == plain.json()["outputs"]
    assert int(packed.headers["content-length"]) < len(plain.content)


def test_non_numeric_version_in_the_path_is_400(client: TestClient) -> None:
    response = client.post("/v2/models/tree/versions/latest/infer", json=infer_body())
    assert response.status_code == 400
    assert "version" in response.json()["error"]


def test_statistics_count_samples_and_executions(client: TestClient) -> None:
    before = client.get("/v2/models/tree/versions/1/stats").json()["model_stats"][0]
    client.post("/v2/models/tree/versions/1/infer", json=infer_body())
    after = client.get("/v2/models/tree/versions/1/stats").json()["model_stats"][0]
    assert after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 2
    assert after["execution_count"] - before["execution_count"] == 1
    assert after["inference_stats"]["queue"]["count"] > before["inference_stats"]["queue"]["count"]
    assert set(after["inference_stats"]) == {
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    }
    everything = client.get("/v2/models/stats").json()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {("tree", "1"), ("linear", "2")}


# -- the client's mistakes get a 4xx with a helpful message -----------------------

BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("malformed JSON", b"{not json", 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("no inputs", {"inputs": []}, 400, "'inputs' must be a non-empty list"),
    (
        "unknown input name",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
        400,
        "unknown input tensor 'x'",
    ),
    (
        "unknown datatype",
        {
            "inputs": [
                {"name": "features", "datatype": "FLOAT", "shape": [1, 4], "data": [1, 2, 3, 4]}
            ]
        },
        400,
        "unknown datatype 'FLOAT'",
    ),
    (
        "wrong datatype",
        {
            "inputs": [
                {"name": "features", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]}
            ]
        },
        400,
        "datatype INT32, expected FP32",
    ),
    (
        "wrong shape",
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}
            ]
        },
        400,
        "expected [-1, 4]",
    ),
    (
        "count mismatch",
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3]}]},
        400,
        "has 3 elements but shape [2, 4]",
    ),
    (
        "ragged nesting",
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "data": [[1, 2, 3, 4], [1, 2]],
                }
            ]
        },
        400,
        "not a valid FP32",
    ),
    (
        "negative dim",
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [-1, 4], "data": [1, 2, 3, 4]}
            ]
        },
        400,
        "non-negative integers",
    ),
    (
        "non-numeric data",
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": ["a", 2, 3, 4]}
            ]
        },
        400,
        "not a valid FP32",
    ),
    (
        "NaN value",
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, None, 3, 4]}
            ]
        },
        400,
        "feature 'f1'",
    ),
    (
        "no data",
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4]}]},
        400,
        "needs 'data' or parameters.binary_data_size",
    ),
    (
        "unknown output",
        {**infer_body(), "outputs": [{"name": "nope"}]},
        400,
        "unknown output 'nope'",
    ),
    (
        "zero rows",
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [0, 4], "data": []}]},
        400,
        "has no rows",
    ),
    (
        "bad timeout",
        {**infer_body(), "parameters": {"timeout": "soon"}},
        400,
        "parameter 'timeout'",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_4xx_naming_the_problem(
    client: TestClient, case: str, body: Any, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = client.post("/v2/models/tree/infer", content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error
    assert response.headers["content-type"] == "application/json"


def test_binary_size_mismatch(client: TestClient) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    )
    response = client.post(
        "/v2/models/tree/infer",
        content=header + b"\0" * 12,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "needs 16" in response.json()["error"]


@pytest.mark.parametrize("value", ["abc", "-1", "999999"])
def test_bad_header_length(client: TestClient, value: str) -> None:
    response = client.post(
        "/v2/models/tree/infer",
        content=orjson.dumps(infer_body()),
        headers={"Inference-Header-Content-Length": value},
    )
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]


def test_unclaimed_binary_bytes_are_rejected(client: TestClient) -> None:
    body, headers = binary_request(X[:1])
    response = client.post("/v2/models/tree/infer", content=body + b"xx", headers=headers)
    assert response.status_code == 400
    assert "not claimed" in response.json()["error"]


def test_unknown_model_and_version(client: TestClient) -> None:
    missing = client.post("/v2/models/nope/infer", json=infer_body())
    assert missing.status_code == 404
    assert "Request for unknown model: 'nope'" in missing.json()["error"]
    assert client.get("/v2/models/tree/versions/9").status_code == 404
    assert client.post("/v2/models/tree/versions/9/infer", json=infer_body()).status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404
    bad = client.get("/v2/models/tree/versions/latest")
    assert bad.status_code == 400
    assert "version must be a whole number in ASCII digits" in bad.json()["error"]


def test_wrong_method_and_route(client: TestClient) -> None:
    assert client.get("/v2/models/tree/infer").status_code == 405
    assert client.get("/v2/models/tree/infer").json()["error"]
    assert client.get("/v3/whatever").status_code == 404


def test_oversized_body_is_413(client: TestClient) -> None:
    big = np.zeros((5000, 4), dtype=np.float32)
    body, headers = binary_request(big)
    response = client.post("/v2/models/tree/infer", content=body, headers=headers)
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]


def test_oversized_admin_body_is_413_before_parsing(client: TestClient) -> None:
    padding = b" " * (64 * 1024 + 1)
    for path in ("/v2/repository/index", "/v2/repository/models/tree/load"):
        response = client.post(path, content=b'{"ready": true}' + padding)
        assert response.status_code == 413, path
        assert "exceeds 65536 bytes" in response.json()["error"]
    assert client.get("/v2/models/tree/ready").status_code == 200, "nothing was reloaded"


def test_model_list_describes_the_version_that_answers(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v2/models").json()["models"]}
    assert set(models) == {"linear", "tree"}
    for doc in models.values():
        assert doc["versions"] == ["1", "2"]
        assert doc["properties"]["version"] == "2"
        assert doc["properties"]["state"] == "READY"
    assert models["tree"]["platform"] == "xgboost_ubj"
    assert models["linear"]["platform"] == "onnxruntime_onnx"


def test_bytes_tensor_roundtrip_in_binary_codec() -> None:
    from server.http.codec import decode_infer

    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    )
    decoded = decode_infer(header + blob, str(len(header)), "m", None)
    assert decoded.request.inputs["s"].tolist() == [b"ab", b"", b"xyz"]


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BOOL", [True, False], np.array([True, False])),
        ("UINT8", [0, 255], np.array([0, 255], dtype=np.uint8)),
        ("INT64", [-(2**40), 3], np.array([-(2**40), 3], dtype=np.int64)),
        ("FP16", [0.5, 1.0], np.array([0.5, 1.0], dtype=np.float16)),
        ("FP64", [0.1, None], np.array([0.1, np.nan])),
        ("BYTES", [["a", "b"]], np.array([b"a", b"b"], dtype=object)),
    ],
)
def test_json_datatypes_decode(datatype: str, data: list[Any], expected: np.ndarray) -> None:
    from server.http.codec import decode_infer

    body = orjson.dumps(
        {"inputs": [{"name": "t", "datatype": datatype, "shape": [2], "data": data}]}
    )
    array = decode_infer(body, None, "m", None).request.inputs["t"]
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [0, 256], "out of range for UINT8"),
        ("INT32", [1.5, 2], "must be integers"),
        ("BOOL", [1, 0], "true/false"),
        ("BYTES", [1, 2], "must be strings"),
    ],
)
def test_json_datatype_mistakes(datatype: str, data: list[Any], message: str) -> None:
    from server.errors import InvalidInput
    from server.http.codec import decode_infer

    body = orjson.dumps(
        {"inputs": [{"name": "t", "datatype": datatype, "shape": [2], "data": data}]}
    )
    with pytest.raises(InvalidInput, match=message):
        decode_infer(body, None, "m", None)


# -- repository extension -------------------------------------------------------


def test_repository_index_load_unload(client: TestClient) -> None:
    index = client.post("/v2/repository/index").json()
    assert {(r["name"], r["version"], r["state"]) for r in index} >= {("tree", "1", "READY")}
    unload = client.post(
        "/v2/repository/models/linear/unload", json={"parameters": {"unload_dependents": False}}
    )
    assert unload.status_code == 200
    assert client.get("/v2/models/linear/ready").status_code == 503
    gone = client.post("/v2/models/linear/infer", json=infer_body())
    assert gone.status_code == 503
    assert "Retry-After" in gone.headers
    assert client.post("/v2/repository/models/linear/load").status_code == 200
    assert client.post("/v2/models/linear/infer", json=infer_body()).status_code == 200
    assert client.post("/v2/repository/models/nope/load").status_code == 404
    upload = client.post(
        "/v2/repository/models/linear/load", json={"parameters": {"file:1/model.onnx": "AAAA"}}
    )
    assert upload.status_code == 501


def test_overload_and_not_ready_map_to_503_with_retry_after() -> None:
    from server.errors import DeadlineExceeded, ModelNotReady, Overloaded
    from server.http.errors import serving_error_response

    for error in (Overloaded("queue full", retry_after_s=2), ModelNotReady("loading")):
        response = serving_error_response(error, retry_after_s=1)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert orjson.loads(response.body)["error"] == error.message
    assert serving_error_response(DeadlineExceeded("late"), 1).status_code == 504
