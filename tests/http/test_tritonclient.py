"""The official ``tritonclient.http`` client against a real server on the example models.

What a Triton user would do on day one: check health, read metadata and config,
list the repository, and score holdout rows with JSON and binary tensors. The
answers must equal the artifact's own predictions computed here, in process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import tritonclient.http as triton
import xgboost as xgb
import yaml
from conftest import RunningServer
from tritonclient.utils import InferenceServerException

ROWS = 37  # an odd count, so nothing lines up with batch sizes by chance


@pytest.fixture(scope="module")
def client(example_server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=f"127.0.0.1:{example_server.port}")
    yield connection
    connection.close()


def feature_names(repo: Path, model: str) -> list[str]:
    doc = yaml.safe_load((repo / model / "model.yaml").read_text())
    return [str(name) for name in doc["inputs"][0]["feature_names"]]


def holdout_rows(repo: Path, model: str, version: int) -> np.ndarray:
    table = pq.read_table(repo / model / str(version) / "holdout.parquet")
    names = feature_names(repo, model)
    matrix = np.column_stack([table[name].to_numpy() for name in names])
    return np.ascontiguousarray(matrix[:ROWS], dtype=np.float32)


def fraud_in_process(repo: Path, version: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    booster = xgb.Booster()
    booster.load_model(str(repo / "fraud" / str(version) / "model.ubj"))
    return {"probability": np.asarray(booster.inplace_predict(rows), dtype=np.float32)}


def churn_in_process(repo: Path, version: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(repo / "churn" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(names, {session.get_inputs()[0].name: rows})
    return {name: np.asarray(value) for name, value in zip(names, outputs, strict=True)}


EXPECTED = {"fraud": fraud_in_process, "churn": churn_in_process}
OUTPUTS = {"fraud": ["probability"], "churn": ["label", "probabilities"]}


def infer(
    client: triton.InferenceServerClient,
    model: str,
    rows: np.ndarray,
    *,
    binary: bool,
    version: str = "",
) -> Any:
    tensor = triton.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    wanted = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS[model]]
    return client.infer(model, [tensor], model_version=version, outputs=wanted)


def test_health_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in ("fraud", "churn"):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
        assert client.is_model_ready(model, "2")
    assert not client.is_model_ready("no-such-model")


def test_server_metadata(client: triton.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata["name"] == "sluice"
    assert metadata["version"]
    assert isinstance(metadata["extensions"], list)


@pytest.mark.parametrize(("model", "width"), [("fraud", 30), ("churn", 16)])
def test_model_metadata_and_config(
    client: triton.InferenceServerClient, model: str, width: int
) -> None:
    metadata = client.get_model_metadata(model)
    assert metadata["name"] == model
    assert set(metadata["versions"]) >= {"1", "2"}
    (features,) = metadata["inputs"]
    assert features["name"] == "features"
    assert features["datatype"] == "FP32"
    assert features["shape"] == [-1, width]
    assert [output["name"] for output in metadata["outputs"]] == OUTPUTS[model]

    config = client.get_model_config(model)
    assert config["name"] == model
    assert config["max_batch_size"] > 0


def test_repository_index_lists_every_version(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    listed = {(entry["name"], entry.get("version")) for entry in index}
    for model in ("fraud", "churn"):
        assert (model, "1") in listed
        assert (model, "2") in listed
    assert all(entry["state"] == "READY" for entry in index)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", ["fraud", "churn"])
@pytest.mark.parametrize("version", [1, 2])
def test_inference_equals_in_process_prediction(
    client: triton.InferenceServerClient,
    example_repo: Path,
    model: str,
    version: int,
    binary: bool,
) -> None:
    rows = holdout_rows(example_repo, model, version)
    expected = EXPECTED[model](example_repo, version, rows)

    result = infer(client, model, rows, binary=binary, version=str(version))

    response = result.get_response()
    assert response["model_name"] == model
    assert response["model_version"] == str(version)
    for name in OUTPUTS[model]:
        got = result.as_numpy(name)
        assert got is not None, f"output {name} missing"
        want = expected[name]
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        if model == "fraud":
            # executor auto: small batches run on compiled trees, within the parity tolerance
            # checked at load (runtime_options.parity_tolerance, 1e-5); pinned to xgboost the
            # answers are bit for bit (tests/core/test_executors.py).
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{model} v{version}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{model} v{version} {name}")


def test_unversioned_request_is_answered_by_the_default_version(
    client: triton.InferenceServerClient, example_repo: Path
) -> None:
    rows = holdout_rows(example_repo, "fraud", 2)
    result = infer(client, "fraud", rows, binary=True)
    assert result.get_response()["model_version"] == "2"
    np.testing.assert_array_equal(
        result.as_numpy("probability"), fraud_in_process(example_repo, 2, rows)["probability"]
    )


def test_bad_tensor_is_a_client_error_naming_the_tensor(
    client: triton.InferenceServerClient,
) -> None:
    rows = np.zeros((2, 29), dtype=np.float32)  # fraud wants 30 features
    with pytest.raises(InferenceServerException) as caught:
        infer(client, "fraud", rows, binary=True)
    assert caught.value.status() == "400"
    assert "features" in caught.value.message()


def test_statistics_count_the_inferences(client: triton.InferenceServerClient) -> None:
    before = client.get_inference_statistics("churn", "1")["model_stats"][0]
    infer(client, "churn", np.zeros((3, 16), dtype=np.float32), binary=False, version="1")
    after = client.get_inference_statistics("churn", "1")["model_stats"][0]
    assert after["name"] == "churn"
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 1
    )
