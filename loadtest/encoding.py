"""V2 inference request bodies (JSON or the binary tensor extension) and HTTP framing."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from loadtest.errors import DataError

NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input tensor: ``array`` already has the full shape, batch dimension included."""

    name: str
    datatype: str
    array: np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class Body:
    """An encoded request body; ``json_length`` is set for the binary extension."""

    data: bytes
    json_length: int | None
    content_type: str


def numpy_type(datatype: str) -> np.dtype[Any]:
    try:
        return NUMPY_TYPES[datatype]
    except KeyError:
        raise DataError(f"datatype {datatype!r} is not supported by the load generator") from None


def encode_json(tensors: Sequence[Tensor], binary_output: bool = False) -> Body:
    """All tensors inline as flat ``data`` lists."""
    inputs = [
        {
            "name": t.name,
            "shape": list(t.array.shape),
            "datatype": t.datatype,
            "data": _json_data(t),
        }
        for t in tensors
    ]
    doc: dict[str, Any] = {"inputs": inputs}
    if binary_output:
        doc["parameters"] = {"binary_data_output": True}
    return Body(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), None, "application/json")


def encode_binary(tensors: Sequence[Tensor], binary_output: bool = False) -> Body:
    """JSON header marking each tensor with ``binary_data_size``, then the raw tensors."""
    inputs = []
    chunks = []
    for t in tensors:
        raw = _raw_bytes(t)
        chunks.append(raw)
        inputs.append(
            {
                "name": t.name,
                "shape": list(t.array.shape),
                "datatype": t.datatype,
                "parameters": {"binary_data_size": len(raw)},
            }
        )
    doc: dict[str, Any] = {"inputs": inputs}
    if binary_output:
        doc["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(doc)
    return Body(header + b"".join(chunks), len(header), "application/octet-stream")


def frame_post(host_header: str, path: str, body: Body) -> bytes:
    """Request line, headers and body as one buffer, ready for a single socket write."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host_header}",
        f"Content-Type: {body.content_type}",
        f"Content-Length: {len(body.data)}",
    ]
    if body.json_length is not None:
        lines.append(f"Inference-Header-Content-Length: {body.json_length}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + body.data


def _json_data(t: Tensor) -> Any:
    flat = t.array.reshape(-1)
    if t.datatype == BYTES:
        return [_text(v) for v in flat.tolist()]
    # orjson writes contiguous numpy arrays natively and float32 in its shortest form.
    return np.ascontiguousarray(flat.astype(numpy_type(t.datatype), copy=False))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _raw_bytes(t: Tensor) -> bytes:
    if t.datatype != BYTES:
        return np.ascontiguousarray(t.array, dtype=numpy_type(t.datatype)).tobytes()
    parts = []
    for value in t.array.reshape(-1).tolist():
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)
