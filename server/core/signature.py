"""Tensor specifications, V2 datatypes and input validation against a model's signature."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from server.errors import InvalidInput


class Datatype(StrEnum):
    """Open Inference Protocol tensor datatypes."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"


NUMPY_DTYPES: dict[Datatype, np.dtype[np.generic]] = {
    Datatype.BOOL: np.dtype(np.bool_),
    Datatype.UINT8: np.dtype(np.uint8),
    Datatype.UINT16: np.dtype(np.uint16),
    Datatype.UINT32: np.dtype(np.uint32),
    Datatype.UINT64: np.dtype(np.uint64),
    Datatype.INT8: np.dtype(np.int8),
    Datatype.INT16: np.dtype(np.int16),
    Datatype.INT32: np.dtype(np.int32),
    Datatype.INT64: np.dtype(np.int64),
    Datatype.FP16: np.dtype(np.float16),
    Datatype.FP32: np.dtype(np.float32),
    Datatype.FP64: np.dtype(np.float64),
    Datatype.BYTES: np.dtype(object),
}

FLOAT_TYPES = frozenset({Datatype.FP16, Datatype.FP32, Datatype.FP64})

# Triton's model-config enum names, used by the /config endpoint.
CONFIG_TYPE_NAMES: dict[Datatype, str] = {
    dt: ("TYPE_STRING" if dt is Datatype.BYTES else f"TYPE_{dt.value}") for dt in Datatype
}


# Both read on every request: a dict lookup instead of an enum call or a walk.
_BY_NAME: dict[object, Datatype] = {dt.value: dt for dt in Datatype}
_BY_DTYPE: dict[np.dtype[np.generic], Datatype] = {dtype: dt for dt, dtype in NUMPY_DTYPES.items()}


def parse_datatype(value: str, where: str) -> Datatype:
    """Return the Datatype for a V2 string, or raise InvalidInput naming ``where``."""
    found = _BY_NAME.get(value) if isinstance(value, str) else None
    if found is None:
        allowed = ", ".join(d.value for d in Datatype)
        raise InvalidInput(f"{where}: unknown datatype {value!r} (expected one of {allowed})")
    return found


def datatype_of(array: np.ndarray) -> Datatype:
    """The V2 datatype of a numpy array (object arrays are BYTES)."""
    found = _BY_DTYPE.get(array.dtype)
    if found is not None:
        return found
    for dt, np_dtype in NUMPY_DTYPES.items():  # e.g. an explicitly little-endian dtype
        if array.dtype == np_dtype:
            return dt
    raise InvalidInput(f"unsupported numpy dtype {array.dtype}")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared input or output tensor. ``-1`` marks a variable dimension."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()
    allow_nonfinite: bool = False
    # True when the first dimension is the (variable) batch dimension; precomputed
    # because validation asks on every request.
    batched: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batched", bool(self.shape) and self.shape[0] == -1)

    @property
    def numpy_dtype(self) -> np.dtype[np.generic]:
        return NUMPY_DTYPES[self.datatype]

    def describe(self) -> str:
        """Human form used in error messages, e.g. ``FP32[-1, 30]``."""
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.datatype.value}[{dims}]"

    def to_metadata(self) -> dict[str, object]:
        """The tensor as the V2 model-metadata endpoint shows it."""
        return {"name": self.name, "datatype": self.datatype.value, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Signature:
    """A model's inputs and outputs, in declaration order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_names", frozenset(o.name for o in self.outputs))

    def input(self, name: str) -> TensorSpec | None:
        """The input spec called ``name``, if any."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    @property
    def batched(self) -> bool:
        """True when every input carries a leading batch dimension."""
        return bool(self.inputs) and all(s.batched for s in self.inputs)


def validate_inputs(
    model: str, signature: Signature, inputs: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
    """Check decoded request tensors against the signature.

    Returns the inputs in signature order and the number of rows (the batch
    size; 1 for models without a batch dimension). Every mistake raises
    InvalidInput naming the model, the tensor and what was expected.
    """
    unknown = [name for name in inputs if signature.input(name) is None]
    if unknown:
        expected = ", ".join(s.name for s in signature.inputs)
        raise InvalidInput(
            f"model '{model}': unknown input tensor '{unknown[0]}' (expected inputs: {expected})"
        )
    ordered: dict[str, np.ndarray] = {}
    rows: int | None = None
    for spec in signature.inputs:
        array = inputs.get(spec.name)
        if array is None:
            raise InvalidInput(
                f"model '{model}': missing input tensor '{spec.name}' ({spec.describe()})"
            )
        _check_tensor(model, spec, array)
        if spec.batched:
            if rows is not None and array.shape[0] != rows:
                raise InvalidInput(
                    f"model '{model}': input '{spec.name}' has {array.shape[0]} rows "
                    f"but other inputs have {rows}"
                )
            rows = array.shape[0]
        ordered[spec.name] = array
    return ordered, (rows if rows is not None else 1)


def _check_tensor(model: str, spec: TensorSpec, array: np.ndarray) -> None:
    got = datatype_of(array)
    if got is not spec.datatype:
        raise InvalidInput(
            f"model '{model}': input '{spec.name}' has datatype {got.value}, "
            f"expected {spec.datatype.value}"
        )
    if not _shape_fits(spec.shape, array.shape):
        raise InvalidInput(
            f"model '{model}': input '{spec.name}' has shape {list(array.shape)}, "
            f"expected {list(spec.shape)} (-1 = any size)"
        )
    if spec.batched and array.shape[0] == 0:
        raise InvalidInput(f"model '{model}': input '{spec.name}' has no rows")
    if spec.datatype in FLOAT_TYPES and not spec.allow_nonfinite:
        finite = np.isfinite(array)
        if not finite.all():
            position = np.unravel_index(int(np.argmin(finite)), array.shape)
            where = _element_name(spec, tuple(int(p) for p in position))
            raise InvalidInput(
                f"model '{model}': input '{spec.name}' has a non-finite value "
                f"({array[position]!r}) at {where}; this model does not accept NaN or infinity"
            )


def _shape_fits(wanted: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(wanted) != len(shape):
        return False
    for want, have in zip(wanted, shape, strict=True):  # noqa: SIM110 (no generator per request)
        if want != have and want != -1:
            return False
    return True


def _element_name(spec: TensorSpec, position: Sequence[int]) -> str:
    where = f"index {list(position)}"
    if spec.feature_names and len(position) == 2 and position[1] < len(spec.feature_names):
        where += f" (row {position[0]}, feature '{spec.feature_names[position[1]]}')"
    return where
