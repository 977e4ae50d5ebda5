"""``GET /openapi.json``: an OpenAPI 3.0 document of every route this server answers.

Built from the route table itself, so a route cannot be served without being
described (a test checks both ways); the schemas follow the Open Inference
Protocol's and Triton's extensions as the codec reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

_REF = "#/components/schemas/"
_JSON = "application/json"

_TENSOR_DATA: dict[str, Any] = {
    "type": "array",
    "items": {
        "anyOf": [
            {"$ref": _REF + "tensor_data"},
            {"type": "number"},
            {"type": "string"},
            {"type": "boolean"},
            {"nullable": True},
        ]
    },
}
_PARAMETERS: dict[str, Any] = {"type": "object", "additionalProperties": True}
SCHEMAS: dict[str, Any] = {
    "error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "tensor_data": _TENSOR_DATA,
    "parameters": _PARAMETERS,
    "request_input": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": {"$ref": _REF + "parameters"},
            "data": {"$ref": _REF + "tensor_data"},
        },
        "required": ["name", "shape", "datatype"],
    },
    "request_output": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "parameters": {"$ref": _REF + "parameters"}},
        "required": ["name"],
    },
    "inference_request": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "maxLength": 256},
            "parameters": {"$ref": _REF + "parameters"},
            "inputs": {"type": "array", "items": {"$ref": _REF + "request_input"}},
            "outputs": {"type": "array", "items": {"$ref": _REF + "request_output"}},
        },
        "required": ["inputs"],
    },
    "repository_request": {
        "type": "object",
        "properties": {
            "ready": {"type": "boolean"},
            "parameters": {"$ref": _REF + "parameters"},
        },
    },
    "label": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "label": {
                "anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]
            },
        },
        "required": ["id", "label"],
    },
    "feedback_request": {
        "type": "object",
        "properties": {"labels": {"type": "array", "items": {"$ref": _REF + "label"}}},
    },
}

# The last path segment (or the whole path) -> summary and request body schema.
_OPERATIONS: dict[str, tuple[str, str | None]] = {
    "/v2": ("Server metadata", None),
    "/v2/": ("Server metadata", None),
    "/v2/health/live": ("Server live", None),
    "/v2/health/ready": ("Server ready", None),
    "/v2/models": ("Every loaded model", None),
    "/v2/models/stats": ("Statistics of every model (Triton extension)", None),
    "/v2/repository/index": ("Repository index (Triton extension)", "repository_request"),
    "/metrics": ("Prometheus metrics", None),
    "/openapi.json": ("This document", None),
    "load": ("Load or reload a model (Triton extension)", "repository_request"),
    "unload": ("Unload a model (Triton extension)", "repository_request"),
    "{name}": ("Model metadata", None),
    "{version}": ("Model version metadata", None),
    "ready": ("Model ready", None),
    "config": ("Model configuration (Triton extension)", None),
    "stats": ("Model statistics (Triton extension)", None),
    "infer": ("Inference (JSON or the binary tensor extension)", "inference_request"),
    "drift": ("Drift, data-quality and concept-drift report", None),
    "feedback": ("Ground-truth labels for earlier predictions", "feedback_request"),
    "traffic": ("Traffic document: primary, canary, shadows", None),
    "{action}": ("Traffic action: promote, rollback, pause", None),
    "approve": ("Approve a version", None),
    "approval": ("A version's approval", None),
}


def openapi_document(routes: Iterable[BaseRoute], version: str) -> dict[str, Any]:
    """The document for ``routes`` (every ``Route`` of the app, the infer ones included)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            paths.setdefault(route.path, {})[method.lower()] = _operation(route.path, method)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Sluice",
            "version": version,
            "description": "Open Inference Protocol (KServe V2) with Triton's extensions",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


def _operation(path: str, method: str) -> dict[str, Any]:
    key = path if path in _OPERATIONS else path.rsplit("/", 1)[-1]
    summary, body = _OPERATIONS.get(key, (f"{method} {path}", None))
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": method.lower() + path.replace("/", "_").replace("{", "").replace("}", ""),
        "responses": {
            "200": {"description": "OK"},
            "4XX": {
                "description": "Refused",
                "content": {_JSON: {"schema": {"$ref": _REF + "error"}}},
            },
            "503": {"description": "Overloaded or not ready"},
        },
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in ("name", "version", "action")
        if "{" + name + "}" in path
    ]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": body == "inference_request",
            "content": {_JSON: {"schema": {"$ref": _REF + body}}},
        }
    return operation


def openapi_route(routes: Iterable[BaseRoute], version: str) -> Route:
    """``GET /openapi.json`` describing ``routes`` and itself (rendered once)."""
    body = b""

    async def serve(request: Request) -> Response:
        return Response(body, media_type=_JSON)

    route = Route("/openapi.json", serve, methods=["GET"])
    body = orjson.dumps(openapi_document([*routes, route], version))
    return route
