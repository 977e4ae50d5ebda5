"""A small credit model with a reference profile and a model card, and traffic to send it.

Features: four standard normals ``x0..x3``, a three-valued ``channel`` and a
binary ``flag`` (both categorical). The label is a noisy logistic function of
them, so the holdout AUC on the card is well above 0.5 and inverted labels
make the live AUC collapse.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson
import yaml

from server.core.monitoring.quality import accuracy, log_loss, roc_auc
from server.core.monitoring.reference import build_reference

FEATURES = ("x0", "x1", "x2", "x3", "channel", "flag")
CATEGORICAL = frozenset({"channel", "flag"})
MODEL = "credit"
T = TypeVar("T")


def sample(rows: int, seed: int, shift: dict[str, float] | None = None) -> np.ndarray:
    """Rows from the training distribution; ``shift`` adds a constant to named features."""
    rng = np.random.default_rng(seed)
    x = np.empty((rows, len(FEATURES)), dtype=np.float32)
    x[:, :4] = rng.normal(size=(rows, 4))
    x[:, 4] = rng.choice([0.0, 1.0, 2.0], size=rows, p=[0.5, 0.3, 0.2])
    x[:, 5] = rng.random(rows) < 0.3
    for name, delta in (shift or {}).items():
        x[:, FEATURES.index(name)] += delta
    return x


def labels_for(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    logit = 1.5 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] + 0.8 * x[:, 5] - 0.4 * x[:, 4]
    return (logit + rng.logistic(size=len(x)) > 0).astype(np.float64)


def model_config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "runtime": "xgboost",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [-1, len(FEATURES)],
                "feature_names": list(FEATURES),
                "allow_nonfinite": True,
            }
        ],
        "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1]}],
        "batching": {"max_batch_size": 256, "max_queue_delay_ms": 1.0},
        "version_policy": {"latest": 1},
    }
    doc.update(overrides)
    return doc


def build_credit(root: Path, **overrides: Any) -> Path:
    """``root/credit/1``: model.ubj, reference.json (training data) and card.yaml (holdout)."""
    import xgboost as xgb

    folder = root / MODEL / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (root / MODEL / "model.yaml").write_text(yaml.safe_dump(model_config(**overrides)))
    train, holdout = sample(4000, seed=1), sample(2000, seed=2)
    y_train, y_holdout = labels_for(train, 1), labels_for(holdout, 2)
    dtrain = xgb.DMatrix(train, label=y_train, feature_names=list(FEATURES))
    params = {"objective": "binary:logistic", "max_depth": 3, "seed": 0, "nthread": 1}
    booster = xgb.train(params, dtrain, num_boost_round=20)
    booster.save_model(str(folder / "model.ubj"))
    scores = booster.predict(xgb.DMatrix(holdout, feature_names=list(FEATURES)))
    metrics = {
        "auc": roc_auc(scores, y_holdout),
        "log_loss": log_loss(scores, y_holdout),
        "accuracy": accuracy(scores, y_holdout),
    }
    (folder / "card.yaml").write_text(yaml.safe_dump({"metrics": {"holdout": metrics}}))
    train_scores = booster.predict(dtrain)
    reference = build_reference(
        MODEL,
        1,
        {name: train[:, i] for i, name in enumerate(FEATURES)},
        {"probability": (train_scores, None)},
        categorical=CATEGORICAL,
    )
    (folder / "reference.json").write_bytes(orjson.dumps(reference))
    return root


def infer_body(x: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": [_json_number(float(v)) for v in x.reshape(-1)],
            }
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    return body


def _json_number(value: float) -> float | str | None:
    """JSON has no NaN or infinity: null reads as NaN, and "inf" strings as infinities."""
    if np.isnan(value):
        return None
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# -- real processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """Poll ``check`` until it returns a value, within a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)  # polling interval of a bounded wait, not synchronisation


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(repo: Path, log: Path, env: dict[str, str]) -> Server:
    """``sluice serve`` on a free port, configured by ``env``; waits for /v2/health/ready."""
    port = free_port()
    sluice = Path(sys.executable).with_name("sluice")
    command = [str(sluice)] if sluice.exists() else [sys.executable, "-m", "server"]
    handle = log.open("wb")
    process = subprocess.Popen(
        [*command, "serve", "--model-repository", str(repo), "--port", str(port)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    server = Server(process, f"http://127.0.0.1:{port}", log)

    def ready() -> bool | None:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            return httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200 or None
        except httpx.TransportError:
            return None

    try:
        wait_until(ready, "the server to be ready")
    except BaseException:
        server.stop()
        raise
    return server
