"""The bare-HTTP floor: Starlette and orjson, a V2 request parsed, a fixed V2 answer, no model.

    BENCH_MODEL=fraud BENCH_OUTPUT=probability uvicorn --factory \
        loadtest.benchmarks.apps.floor:create_app --loop uvloop --http httptools --no-access-log

It reads the JSON document (or, for the binary tensor extension, its JSON
header) to learn how many rows came, and answers the same bytes every time for
that many rows. Nothing a real server does after parsing is here, so no server
on the same stack can beat it.
"""

from __future__ import annotations

import os

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HEADER_LENGTH = "inference-header-content-length"


def create_app() -> Starlette:
    """The floor app for ``$BENCH_MODEL`` answering ``$BENCH_OUTPUT``."""
    model = os.environ.get("BENCH_MODEL", "fraud")
    output = os.environ.get("BENCH_OUTPUT", "probability")
    answers: dict[int, bytes] = {}

    def answer(rows: int) -> bytes:
        body = answers.get(rows)
        if body is None:
            doc = {
                "model_name": model,
                "outputs": [
                    {"name": output, "datatype": "FP32", "shape": [rows], "data": [0.5] * rows}
                ],
            }
            body = answers[rows] = orjson.dumps(doc)
        return body

    async def infer(request: Request) -> Response:
        if request.path_params["model"] != model:
            return JSONResponse({"error": "unknown model"}, status_code=404)
        body = await request.body()
        split = request.headers.get(HEADER_LENGTH)
        doc = orjson.loads(body if split is None else body[: int(split)])
        rows = int(doc["inputs"][0]["shape"][0])
        return Response(answer(rows), media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/v2/health/ready", ready),
            Route("/v2/models/{model}/ready", ready),
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        ]
    )
