"""What many teams write: FastAPI, a pydantic body, the booster called in the handler.

    BENCH_MODEL=fraud BENCH_MODEL_FILE=models/fraud/2/model.ubj uvicorn --factory \
        loadtest.benchmarks.apps.fastapi_app:create_app --loop uvloop --http httptools

Plain and idiomatic on purpose: a synchronous handler (FastAPI runs it in its
thread pool, as its documentation advises for blocking calls), the request
validated by pydantic, ``inplace_predict`` per request, a dict returned.
JSON tensors only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xgboost as xgb
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceRequest(BaseModel):
    inputs: list[RequestInput]


def create_app() -> FastAPI:
    """The app serving ``$BENCH_MODEL_FILE`` as ``$BENCH_MODEL``."""
    model = os.environ.get("BENCH_MODEL", "fraud")
    booster = xgb.Booster(model_file=os.environ["BENCH_MODEL_FILE"])
    app = FastAPI()

    @app.get("/v2/health/ready")
    def server_ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{model_name}/ready")
    def model_ready(model_name: str) -> dict[str, bool]:
        if model_name != model:
            raise HTTPException(404, "unknown model")
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer")
    def infer(model_name: str, request: InferenceRequest) -> dict[str, Any]:
        if model_name != model:
            raise HTTPException(404, "unknown model")
        tensor = request.inputs[0]
        features = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
        probability = booster.inplace_predict(features)
        return {
            "model_name": model,
            "outputs": [
                {
                    "name": "probability",
                    "datatype": "FP32",
                    "shape": list(probability.shape),
                    "data": probability.tolist(),
                }
            ],
        }

    return app
