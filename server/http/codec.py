"""V2 inference request/response codec: JSON and the binary tensor extension.

Decoding produces numpy arrays straight from the JSON lists or as views of the
binary section; no per-element Python loops except for BYTES tensors.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import orjson

from server.core.service import InferenceRequest, InferenceResult
from server.core.signature import FLOAT_TYPES, NUMPY_DTYPES, Datatype, parse_datatype
from server.core.tensors import tensor_bytes
from server.errors import InvalidInput

if TYPE_CHECKING:
    from server.http.memo import MemoEntry

HEADER_LENGTH = "inference-header-content-length"
MAX_ID_CHARS = 256  # a request id is kept with its prediction until labelled: bound its size
MAX_DIMS = 32  # what numpy 1.x can hold; numpy 2 fails past 64
_FLOAT_ELEMENTS = frozenset({float, int, type(None)})
_INT_ELEMENTS = frozenset({int})
_SLICE_ELEMENTS = 1 << 16  # about a millisecond of numpy conversion


@dataclass(slots=True)
class DecodedInfer:
    """A request plus how the client wants each output encoded."""

    request: InferenceRequest
    binary_default: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    memo: MemoEntry | None = None  # how ``server.http.memo`` knows this body, if it does

    def wants_binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate``; a small body may not expand past ``limit``."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding '{encoding}' (use gzip or deflate)")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from exc
    if len(data) > limit:
        raise InvalidInput(f"decompressed request body exceeds {limit} bytes")
    return data


def decode_infer(
    body: bytes, header_length: str | None, model: str, version: int | None
) -> DecodedInfer:
    """Parse a V2 infer body (JSON header plus optional binary tensors)."""
    json_part, binary = _split(body, header_length)
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"model '{model}': request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput(f"model '{model}': request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput(f"model '{model}': 'inputs' must be a non-empty list of tensors")
    parameters = _parameters(doc.get("parameters"), f"model '{model}': request 'parameters'")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        name, array, offset = _decode_input(model, index, raw, binary, offset)
        if name in inputs:
            raise InvalidInput(f"model '{model}': input '{name}' appears twice")
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInput(
            f"model '{model}': {len(binary) - offset} bytes of binary data were not claimed by "
            "any input's binary_data_size"
        )
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidInput(f"model '{model}': 'id' must be a string")
        if len(request_id) > MAX_ID_CHARS:
            raise InvalidInput(
                f"model '{model}': 'id' has {len(request_id)} characters; at most "
                f"{MAX_ID_CHARS} are allowed"
            )
    decoded = DecodedInfer(
        InferenceRequest(model, inputs, version, None, request_id, parameters),
        binary_default=parameters.get("binary_data_output") is True,
    )
    _decode_outputs(model, doc.get("outputs"), decoded)
    return decoded


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(
            f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
        ) from None
    if not 0 <= length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {length} is outside the body (length {len(body)})"
        )
    return body[:length], body[length:]


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where} must be an object")
    return raw


def _decode_input(
    model: str, index: int, raw: Any, binary: bytes, offset: int
) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"model '{model}': inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"model '{model}': inputs[{index}] needs a 'name' string")
    where = f"model '{model}': input '{name}'"
    datatype = parse_datatype(raw.get("datatype", ""), where)
    shape = raw.get("shape")
    if not _is_shape(shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{where}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    count = math.prod(shape)
    params = _parameters(raw.get("parameters"), f"{where}: 'parameters'")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise InvalidInput(f"{where}: has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidInput(
                f"{where}: binary_data_size {size} runs past the end of the binary data "
                f"({len(binary) - offset} bytes left)"
            )
        chunk = binary[offset : offset + size]
        return name, _from_binary(where, datatype, shape, count, chunk), offset + size
    if "data" not in raw:
        raise InvalidInput(f"{where}: needs 'data' or parameters.binary_data_size")
    return name, _from_json(where, datatype, shape, count, raw["data"]), offset


def _is_shape(shape: Any) -> TypeGuard[list[int]]:
    if not isinstance(shape, list):
        return False
    for d in shape:  # noqa: SIM110 (no generator per request); ``type`` excludes bool
        if type(d) is not int or d < 0:
            return False
    return True


def _from_binary(
    where: str, datatype: Datatype, shape: list[int], count: int, chunk: bytes
) -> np.ndarray:
    if datatype is Datatype.BYTES:
        return _bytes_from_binary(where, shape, count, chunk)
    dtype = NUMPY_DTYPES[datatype].newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: binary_data_size is {len(chunk)} bytes but shape {shape} of "
            f"{datatype.value} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _bytes_from_binary(where: str, shape: list[int], count: int, chunk: bytes) -> np.ndarray:
    items: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"{where}: truncated BYTES element length at byte {pos}")
        length = int.from_bytes(chunk[pos : pos + 4], "little")
        pos += 4
        if pos + length > len(chunk):
            raise InvalidInput(f"{where}: BYTES element {len(items)} runs past its tensor data")
        items.append(chunk[pos : pos + length])
        pos += length
    if len(items) != count:
        raise InvalidInput(f"{where}: has {len(items)} BYTES elements, shape {shape} needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _from_json(
    where: str, datatype: Datatype, shape: list[int], count: int, data: Any
) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype is Datatype.BYTES:
            array = _bytes_from_json(where, data)
        elif datatype is Datatype.BOOL:
            array = _bool_from_json(where, data)
        else:
            array = _number_from_json(where, datatype, data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"{where}: 'data' is not a valid {datatype.value} tensor ({_short(exc)})"
        ) from None
    if array.size != count:
        raise InvalidInput(
            f"{where}: 'data' has {array.size} elements but shape {shape} needs {count}"
        )
    return array.reshape(shape)


def _number_from_json(where: str, datatype: Datatype, data: list[Any]) -> np.ndarray:
    # The element types first: asked for a dtype, numpy would turn "1.5" and true into
    # numbers, and the protocol allows neither (one C-level pass, ~15 ns an element).
    floats = datatype in FLOAT_TYPES
    if not _element_types(data) <= (_FLOAT_ELEMENTS if floats else _INT_ELEMENTS):
        if floats:
            raise InvalidInput(
                f"{where}: 'data' is not a valid {datatype.value} tensor: JSON numbers only "
                "(null for a missing value), not strings or booleans"
            )
        raise InvalidInput(f"{where}: {datatype.value} data must be integers (JSON numbers)")
    target = NUMPY_DTYPES[datatype]
    if floats:
        return _converted(data, target)  # null becomes NaN: a missing value
    raw = _converted(data, None)
    if raw.size:
        info = np.iinfo(target)  # type: ignore[type-var]
        low, high = int(raw.min()), int(raw.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidInput(f"{where}: value {bad} is out of range for {datatype.value}")
    return raw.astype(target, copy=False)


def _converted(data: list[Any], dtype: np.dtype[Any] | None) -> np.ndarray:
    """``np.asarray(data, dtype)``, in slices of about ``_SLICE_ELEMENTS`` for long lists.

    Each numpy call holds the GIL; slices let the event loop in between them
    when a large body is decoded in a thread (same total work).
    """
    if len(data) <= _SLICE_ELEMENTS // 64:
        return np.asarray(data, dtype=dtype)
    first = data[0]
    step = max(1, _SLICE_ELEMENTS // (len(first) if isinstance(first, list) and first else 1))
    if len(data) <= step:
        return np.asarray(data, dtype=dtype)
    parts = [np.asarray(data[i : i + step], dtype=dtype) for i in range(0, len(data), step)]
    return np.concatenate(parts)


def _bool_from_json(where: str, data: list[Any]) -> np.ndarray:
    raw = np.asarray(data)
    if raw.size and raw.dtype != np.bool_:
        raise InvalidInput(f"{where}: BOOL data must be true/false values")
    return raw.astype(np.bool_, copy=False)


def _element_types(data: list[Any]) -> set[type]:
    """The types of a (nested) list's elements; ``map(type)`` keeps each walk in C."""
    kinds = set(map(type, data))
    if list not in kinds:
        return kinds
    if len(kinds) == 1:  # rows: one pass over all of them
        inner = set(map(type, chain.from_iterable(data)))
        if list not in inner:
            return inner
    found: set[type] = set()
    stack = [data]
    while stack:
        kinds = set(map(type, items := stack.pop()))
        if list in kinds:
            kinds.discard(list)
            stack += [item for item in items if type(item) is list]
        found |= kinds
    return found


def _bytes_from_json(where: str, data: list[Any]) -> np.ndarray:
    flat: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            if not isinstance(element, str):
                raise InvalidInput(f"{where}: BYTES elements must be strings in JSON")
            flat.append(element.encode())
        else:
            stack.pop()
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def _decode_outputs(model: str, raw: Any, decoded: DecodedInfer) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise InvalidInput(f"model '{model}': 'outputs' must be a list")
    names = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"model '{model}': outputs[{index}] needs a 'name' string")
        params = _parameters(item.get("parameters"), f"model '{model}': output parameters")
        if "classification" in params:
            raise InvalidInput(
                f"model '{model}': output '{item['name']}': the classification extension "
                "is not supported"
            )
        binary = params.get("binary_data")
        if binary is not None:
            decoded.binary_outputs[item["name"]] = bool(binary)
        names.append(item["name"])
    decoded.request.outputs = names


def encode_infer(result: InferenceResult, decoded: DecodedInfer) -> tuple[bytes, int | None]:
    """Encode a result; returns the body and the JSON header length when any output is binary."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for spec in result.specs:
        array = result.outputs[spec.name]
        entry: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.datatype.value,
            "shape": list(array.shape),
        }
        if decoded.wants_binary(spec.name):
            blob = tensor_bytes(spec.datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif spec.datatype is Datatype.BYTES:
            entry["data"] = [_bytes_text(v) for v in array.reshape(-1)]
        else:
            if array.dtype == np.float16:  # orjson has no half floats
                array = array.astype(np.float32)
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if result.id is not None:
        doc["id"] = result.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _bytes_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
