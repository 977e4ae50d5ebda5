"""Telemetry, drift, data quality and feedback over HTTP, in process (ASGI with lifespan)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from monitoring_support import FEATURES, MODEL, build_credit, infer_body, labels_for, sample
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from server import __version__
from server.config import DriftSettings, FeedbackSettings, Settings, TelemetrySettings
from server.http.app import create_app

INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``credit`` version 1 with reference.json and card.yaml. Read-only for tests."""
    return build_credit(tmp_path_factory.mktemp("credit"))


def settings(repo: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "model_repository": repo,
        "drift": DriftSettings(window_rows=250, windows=4, interval_s=0),
        "feedback": FeedbackSettings(window_labels=400, min_labels=150),
    }
    return Settings(**{**defaults, **overrides})


@pytest.fixture
def client(credit_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(credit_repo))) as test_client:
        yield test_client


def samples(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of /metrics by name: [(labels, value), ...]."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    found = [v for got, v in metrics.get(name, []) if labels.items() <= got.items()]
    assert len(found) == 1, (name, labels, metrics.get(name))
    return found[0]


def send(client: TestClient, x: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    response = client.post(INFER, json=infer_body(x, request_id))
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_http_duration_histogram_uses_route_templates_and_second_buckets(
    client: TestClient,
) -> None:
    send(client, sample(3, seed=1))
    send(client, sample(2, seed=2))
    assert client.post(INFER, json={"inputs": []}).status_code == 400
    assert client.get("/no/such/path").status_code == 404
    metrics = samples(client)
    ok = {"http_request_method": "POST", "http_route": "/v2/models/{name}/infer"}
    name = "http_server_request_duration_seconds"
    assert value(metrics, f"{name}_count", **ok, http_response_status_code="200") == 2
    assert value(metrics, f"{name}_count", **ok, http_response_status_code="400") == 1
    buckets = {got["le"] for got, _ in metrics[f"{name}_bucket"]}
    assert {"0.0005", "0.001", "0.005", "10.0", "+Inf"} <= buckets
    unrouted = [g for g, _ in metrics[f"{name}_count"] if g["http_response_status_code"] == "404"]
    assert unrouted
    assert all(not got.get("http_route") for got in unrouted)  # never the raw path


def test_per_version_counters_histograms_and_resource(client: TestClient) -> None:
    send(client, sample(4, seed=3))
    send(client, sample(1, seed=4))
    bad = infer_body(sample(1, seed=5))
    bad["inputs"][0]["datatype"] = "FP64"  # decodes, then fails the signature check
    assert client.post(INFER, json=bad).status_code == 400
    metrics = samples(client)
    version = {"model": MODEL, "version": "1"}
    assert value(metrics, "ml_inference_request_success_total", **version) == 2
    failure = value(metrics, "ml_inference_request_failure_total", **version, reason="InvalidInput")
    assert failure == 1
    assert value(metrics, "ml_inference_request_rejected_total", **version) == 0
    assert value(metrics, "ml_inference_count_total", **version) == 5
    assert value(metrics, "ml_inference_batch_size_sum", **version) == 5
    assert value(metrics, "ml_inference_batch_size_bucket", **version, le="4") >= 1
    assert value(metrics, "ml_inference_compute_duration_seconds_count", **version) >= 1
    assert value(metrics, "ml_inference_queue_depth", **version) == 0
    assert value(metrics, "ml_cache_lookups_total", **version, result="miss") == 0
    for counter in ("request", "queue", "compute"):
        assert value(metrics, f"ml_inference_{counter}_time_seconds_total", **version) >= 0
    assert value(metrics, "ml_inference_request_time_seconds_total", **version) > 0
    target = value(metrics, "target_info", service_name="sluice")
    assert target == 1
    assert value(metrics, "target_info", service_version=__version__) == 1


def test_every_answer_carries_an_id(client: TestClient) -> None:
    assert send(client, sample(1, seed=6), "client-7")["id"] == "client-7"
    generated = send(client, sample(1, seed=7))["id"]
    assert isinstance(generated, str)
    assert generated
    assert generated != send(client, sample(1, seed=7))["id"]


def test_drift_report_flags_exactly_the_shifted_features(client: TestClient) -> None:
    for seed in range(4):
        send(client, sample(250, seed=10 + seed))
    report = client.get(f"/v2/models/{MODEL}/drift").json()
    assert report["model"] == MODEL
    assert report["version"] == "1"
    assert report["window"]["rows"] == 1000
    assert report["data_drift"]["status"] == "ok", report["data_drift"]
    assert report["prediction_drift"]["status"] in ("ok", "warn")
    for seed in range(4):
        send(client, sample(250, seed=20 + seed, shift={"x1": 1.5, "x3": -2.0}))
    report = client.get(f"/v2/models/{MODEL}/versions/1/drift").json()
    assert report["window"]["rows_total"] == 2000
    assert sorted(report["data_drift"]["drifted"]) == ["x1", "x3"]
    assert report["data_drift"]["status"] == "alert"
    assert report["status"] == "alert"
    x1 = report["data_drift"]["columns"]["x1"]
    assert x1["psi"] >= 0.25
    assert 0 <= x1["js"] <= 1
    assert x1["p_value"] < 0.05
    assert report["prediction_drift"]["status"] == "alert"  # x1 moves the score
    metrics = samples(client)
    detected = {
        got["feature"]: v for got, v in metrics["ml_drift_detected"] if got["model"] == MODEL
    }
    assert detected == {name: float(name in ("x1", "x3")) for name in FEATURES}
    assert value(metrics, "ml_drift_status", model=MODEL) == 2
    assert value(metrics, "ml_drift_score", feature="x3", method="psi") >= 0.25
    assert value(metrics, "ml_drift_window_rows", model=MODEL) == 1000


def test_data_quality_rates_per_feature(client: TestClient) -> None:
    x = sample(200, seed=30)
    x[:20, 0] = np.nan
    x[20:30, 0] = np.inf
    x[30:70, 2] = 50.0  # far beyond the training range
    # JSON has no infinity (and the codec takes JSON numbers only): binary tensors carry it.
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.astype(np.float32).nbytes},
                }
            ]
        }
    )
    body = header + x.astype("<f4").tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    assert client.post(INFER, content=body, headers=headers).status_code == 200
    report = client.get(f"/v2/models/{MODEL}/drift").json()
    columns = report["data_drift"]["columns"]
    assert columns["x0"]["missing_ratio"] == pytest.approx(0.1)
    assert columns["x0"]["nonfinite_ratio"] == pytest.approx(0.05)
    assert columns["x2"]["out_of_range_ratio"] == pytest.approx(0.2)
    metrics = samples(client)
    assert value(metrics, "ml_feature_missing_ratio", feature="x0") == pytest.approx(0.1)
    assert value(metrics, "ml_feature_nonfinite_ratio", feature="x0") == pytest.approx(0.05)
    assert value(metrics, "ml_feature_out_of_range_ratio", feature="x2") == pytest.approx(0.2)


def test_feedback_below_the_card_auc_flips_concept_drift(client: TestClient) -> None:
    def round_trip(seed: int, invert: bool) -> dict[str, Any]:
        x = sample(100, seed=seed)
        labels = []
        for i in range(4):
            request_id = f"req-{seed}-{i}"
            send(client, x[i * 25 : (i + 1) * 25], request_id)
            y = labels_for(x[i * 25 : (i + 1) * 25], seed=seed)
            labels.append({"id": request_id, "label": (1 - y if invert else y).tolist()})
        response = client.post(f"/v2/models/{MODEL}/feedback", json={"labels": labels})
        assert response.status_code == 200, response.text
        assert response.json()["matched"] == 4
        return dict(client.get(f"/v2/models/{MODEL}/drift").json()["concept_drift"])

    concept = round_trip(40, invert=False)
    assert concept["status"] == "insufficient_data"
    for seed in (41, 42, 43):
        concept = round_trip(seed, invert=False)
    assert concept["status"] == "ok", concept
    assert concept["metrics"]["auc"]["reference"] > 0.7
    assert value(samples(client), "ml_concept_drift_status", model=MODEL) == 0
    for seed in (44, 45, 46, 47):
        concept = round_trip(seed, invert=True)
    assert concept["status"] == "alert", concept
    assert concept["metrics"]["auc"]["live"] < concept["metrics"]["auc"]["reference"] - 0.05
    metrics = samples(client)
    assert value(metrics, "ml_concept_drift_status", model=MODEL) == 2
    assert value(metrics, "ml_performance", metric="auc") < 0.5
    assert value(metrics, "ml_feedback_labels_total", result="matched") == 800


def test_feedback_reports_what_it_could_not_join(client: TestClient) -> None:
    send(client, sample(2, seed=50), "two-rows")
    send(client, sample(1, seed=51), "one-row")
    response = client.post(
        f"/v2/models/{MODEL}/feedback",
        json={
            "labels": [
                {"id": "two-rows", "label": [1]},
                {"id": "never-sent", "label": 0},
                {"id": "one-row", "label": 1},
            ]
        },
    )
    assert response.status_code == 200
    doc = response.json()
    assert doc["matched"] == 1
    assert doc["unmatched_ids"] == ["never-sent"]
    assert "1 label(s) for a request of 2 row(s)" in doc["rejected"][0]
    again = client.post(
        f"/v2/models/{MODEL}/versions/1/feedback", json={"id": "one-row", "label": 1}
    )
    assert again.json()["unmatched"] == 1  # a prediction takes one label


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        (f"/v2/models/{MODEL}/feedback", b"{not json", 400),
        (f"/v2/models/{MODEL}/feedback", b'{"id": "x"}', 400),
        ("/v2/models/nope/feedback", b'{"id": "x", "label": 1}', 404),
        (f"/v2/models/{MODEL}/versions/9/feedback", b'{"id": "x", "label": 1}', 404),
    ],
)
def test_bad_feedback_calls_are_client_errors(
    client: TestClient, path: str, body: bytes, status: int
) -> None:
    response = client.post(path, content=body)
    assert response.status_code == status
    assert "error" in response.json()


def test_drift_of_unknown_model_is_404(client: TestClient) -> None:
    assert client.get("/v2/models/nope/drift").status_code == 404
    assert client.get(f"/v2/models/{MODEL}/versions/9/drift").status_code == 404


def test_everything_off_still_serves(credit_repo: Path) -> None:
    off = settings(
        credit_repo,
        telemetry=TelemetrySettings(enabled=False),
        drift=DriftSettings(enabled=False),
        feedback=FeedbackSettings(enabled=False),
    )
    with TestClient(create_app(off)) as client:
        assert send(client, sample(1, seed=60))["outputs"]
        assert client.get("/metrics").status_code == 501
        assert client.get(f"/v2/models/{MODEL}/drift").status_code == 501
        assert (
            client.post(f"/v2/models/{MODEL}/feedback", json={"id": "a", "label": 1}).status_code
            == 501
        )


def test_drift_without_prometheus_still_reports(credit_repo: Path) -> None:
    quiet = settings(credit_repo, telemetry=TelemetrySettings(enabled=False))
    with TestClient(create_app(quiet)) as client:
        send(client, sample(300, seed=61))
        assert client.get(f"/v2/models/{MODEL}/drift").json()["data_drift"]["status"] == "ok"
        assert client.get("/metrics").status_code == 501
