"""Input columns to model tensors, row by row validation, and model outputs to columns.

Columns are matched by name to ``feature_names`` in model.yaml. The fast path
is vectorised (Arrow casts, one strided copy per column); only rows that fail
are looked at one by one, to say exactly why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa

from server.batch import columns as arrow
from server.batch.errors import BatchUsageError
from server.batch.job import KeepColumns
from server.core.signature import FLOAT_TYPES, Datatype, Signature, TensorSpec

MODEL_NAME_COLUMN = "model_name"
MODEL_VERSION_COLUMN = "model_version"


class BadKind(StrEnum):
    MISSING = "missing"
    UNPARSABLE = "unparsable"
    NONFINITE = "non-finite"
    MALFORMED = "malformed"


@dataclass(slots=True)
class BadRow:
    """A row that was not scored: where it was, why, and what it held."""

    row: int | None
    kind: BadKind
    reason: str
    record: dict[str, Any] = field(default_factory=dict)
    column: str | None = None


@dataclass(frozen=True, slots=True)
class InputBinding:
    """Which columns feed one input tensor (2-D by feature names, or one 1-D column)."""

    spec: TensorSpec
    columns: tuple[str, ...]
    matrix: bool


@dataclass(frozen=True, slots=True)
class OutputBinding:
    """One output tensor and the output columns it becomes (``name`` or ``name_0..``)."""

    spec: TensorSpec
    columns: tuple[str, ...]
    arrow_type: pa.DataType


@dataclass(frozen=True, slots=True)
class ScoringPlan:
    """How a file's columns map to one model version's signature, checked before scoring."""

    model: str
    version: int
    inputs: tuple[InputBinding, ...]
    outputs: tuple[OutputBinding, ...]
    kept: tuple[str, ...]
    output_schema: pa.Schema

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return tuple(c for b in self.inputs for c in b.columns)

    @property
    def read_columns(self) -> list[str]:
        """Every input column the run needs, once each, features first."""
        return list(dict.fromkeys(self.feature_columns + self.kept))


def input_bindings(model: str, signature: Signature) -> tuple[InputBinding, ...]:
    """Map every input tensor to columns, or explain why this model cannot score files."""
    bindings = []
    for spec in signature.inputs:
        if spec.datatype not in FLOAT_TYPES:
            raise BatchUsageError(
                f"model '{model}': input '{spec.name}' is {spec.describe()}; "
                "batch scoring reads numeric columns into FP16/FP32/FP64 inputs only"
            )
        if spec.feature_names and len(spec.shape) == 2 and spec.shape[0] == -1:
            bindings.append(InputBinding(spec, spec.feature_names, matrix=True))
        elif spec.shape == (-1,):
            bindings.append(InputBinding(spec, (spec.name,), matrix=False))
        else:
            raise BatchUsageError(
                f"model '{model}': input '{spec.name}' {spec.describe()} has no feature_names "
                "in model.yaml, so file columns cannot be matched to it"
            )
    return tuple(bindings)


def _output_bindings(model: str, signature: Signature) -> tuple[OutputBinding, ...]:
    bindings = []
    for spec in signature.outputs:
        arrow_type = pa.string() if spec.datatype is Datatype.BYTES else _arrow(spec)
        if spec.shape == (-1,):
            columns: tuple[str, ...] = (spec.name,)
        elif len(spec.shape) == 2 and spec.shape[0] == -1 and spec.shape[1] > 0:
            columns = tuple(f"{spec.name}_{k}" for k in range(spec.shape[1]))
        else:
            raise BatchUsageError(
                f"model '{model}': output '{spec.name}' {spec.describe()} cannot become "
                "columns (batch scoring needs [-1] or [-1, N] outputs)"
            )
        bindings.append(OutputBinding(spec, columns, arrow_type))
    return tuple(bindings)


def _arrow(spec: TensorSpec) -> pa.DataType:
    return pa.from_numpy_dtype(spec.numpy_dtype)


def _usable(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_null(kind)
        or _is_text(kind)
    )


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _names(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def plan_scoring(
    model: str,
    version: int,
    signature: Signature,
    schema: pa.Schema,
    keep: KeepColumns,
    source: str,
) -> ScoringPlan:
    """Check the file's columns against the model before any row is scored."""
    inputs = input_bindings(model, signature)
    present = set(schema.names)
    for binding in inputs:
        missing = [c for c in binding.columns if c not in present]
        if missing:
            raise BatchUsageError(
                f"{source} has no column {_names(missing)}: model '{model}' "
                f"needs it for input '{binding.spec.name}' ({len(missing)} of "
                f"{len(binding.columns)} feature columns missing)"
            )
        for name in binding.columns:
            kind = schema.field(name).type
            if not _usable(kind):
                raise BatchUsageError(
                    f"column '{name}' in {source} has type {kind}: model '{model}' needs "
                    f"numbers for input '{binding.spec.name}' ({binding.spec.datatype.value})"
                )
    kept = tuple(schema.names) if keep.all else keep.names
    unknown = [c for c in kept if c not in present]
    if unknown:
        raise BatchUsageError(f"--keep-columns: {source} has no column {_names(unknown)}")
    outputs = _output_bindings(model, signature)
    produced = [c for b in outputs for c in b.columns] + [MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN]
    clash = [c for c in kept if c in produced]
    if clash:
        raise BatchUsageError(
            f"--keep-columns: column {_names(clash)} would clash with an output column of "
            f"model '{model}' (outputs: {', '.join(produced)})"
        )
    fields = [schema.field(c) for c in kept]
    fields += [pa.field(c, b.arrow_type) for b in outputs for c in b.columns]
    fields += [pa.field(MODEL_NAME_COLUMN, pa.string()), pa.field(MODEL_VERSION_COLUMN, pa.int64())]
    return ScoringPlan(model, version, inputs, outputs, kept, pa.schema(fields))


@dataclass(slots=True)
class Converted:
    """A chunk ready for the model: tensors and kept columns of its good rows."""

    inputs: dict[str, np.ndarray]
    kept: pa.RecordBatch
    bad: list[BadRow]

    @property
    def rows(self) -> int:
        return int(self.kept.num_rows)


@dataclass(slots=True)
class _Column:
    values: np.ndarray
    nulls: np.ndarray | None = None
    unparsable: np.ndarray | None = None


def _text_values(col: pa.Array) -> _Column:
    import pyarrow.compute as pc  # here: 22 ms to import, and float columns never need it

    if pc.any(pc.equal(col, "")).as_py():
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)
    nulls = arrow.nulls(col)
    try:
        return _Column(arrow.values(pc.cast(col, pa.float64())), nulls)
    except pa.ArrowInvalid:
        pass
    # Some value is not a number Arrow can parse: parse this column one value at a time.
    items = col.to_pylist()
    values = np.full(len(items), np.nan)
    bad = np.zeros(len(items), dtype=bool)
    missing = np.zeros(len(items), dtype=bool)
    for i, item in enumerate(items):
        text = item.strip() if item is not None else ""
        if not text:
            missing[i] = True
            continue
        try:
            if "_" in text:
                raise ValueError(text)
            values[i] = float(text)
        except ValueError:
            bad[i] = True
    return _Column(values, missing if missing.any() else None, bad if bad.any() else None)


def _column(col: pa.Array) -> _Column:
    kind = col.type
    if _is_text(kind):
        return _text_values(col)
    if pa.types.is_null(kind):
        return _Column(np.full(len(col), np.nan), np.ones(len(col), dtype=bool))
    if not pa.types.is_floating(kind):
        import pyarrow.compute as pc

        col = pc.cast(col, pa.float64(), safe=False)
    return _Column(arrow.values(col), arrow.nulls(col))


def convert(
    plan: ScoringPlan,
    batch: pa.RecordBatch,
    first_row: int,
    row_ids: np.ndarray | None = None,
    *,
    check_columns: bool = False,
) -> Converted:
    """Build the input tensors; rows that cannot be scored come back as ``BadRow``.

    With ``check_columns`` (the first chunk), a text column in which no value
    is a number is reported as a mistyped column instead of as bad rows.
    """
    n = batch.num_rows
    bad = np.zeros(n, dtype=bool)
    tensors: dict[str, np.ndarray] = {}
    columns: dict[str, _Column] = {}
    for binding in plan.inputs:
        matrix = np.empty((n, len(binding.columns)), dtype=binding.spec.numpy_dtype)
        for j, name in enumerate(binding.columns):
            column = _column(batch.column(name))
            if check_columns:
                _check_numbers(plan, name, column, batch.column(name))
            matrix[:, j] = column.values
            columns[name] = column
            if column.unparsable is not None:
                bad |= column.unparsable
        if not binding.spec.allow_nonfinite:
            bad |= ~np.isfinite(matrix).all(axis=1)
        tensors[binding.spec.name] = matrix if binding.matrix else matrix[:, 0]
    if not bad.any():
        return Converted(tensors, batch.select(list(plan.kept)), [])
    bad_rows = np.flatnonzero(bad)
    good_rows = np.flatnonzero(~bad)
    records = batch.take(arrow.array(bad_rows, pa.int64())).to_pylist()
    ids = bad_rows + first_row if row_ids is None else row_ids[bad_rows]
    reasons = [
        _why(plan, tensors, columns, batch, int(i), int(row), record)
        for i, row, record in zip(bad_rows, ids, records, strict=True)
    ]
    good = arrow.array(good_rows, pa.int64())
    return Converted(
        {name: t[good_rows] for name, t in tensors.items()},
        batch.select(list(plan.kept)).take(good),
        reasons,
    )


def _check_numbers(plan: ScoringPlan, name: str, column: _Column, raw: pa.Array) -> None:
    if column.unparsable is None:
        return
    missing = int(column.nulls.sum()) if column.nulls is not None else 0
    if int(column.unparsable.sum()) + missing < len(raw):
        return
    example = raw[int(np.argmax(column.unparsable))].as_py()
    raise BatchUsageError(
        f"column '{name}' holds no numbers in the first {len(raw)} rows (e.g. {example!r}): "
        f"model '{plan.model}' needs numbers there; is it the right column?"
    )


def _why(
    plan: ScoringPlan,
    tensors: Mapping[str, np.ndarray],
    columns: Mapping[str, _Column],
    batch: pa.RecordBatch,
    i: int,
    row: int,
    record: dict[str, Any],
) -> BadRow:
    for binding in plan.inputs:
        tensor = tensors[binding.spec.name]
        for j, name in enumerate(binding.columns):
            column = columns[name]
            if column.unparsable is not None and column.unparsable[i]:
                raw = batch.column(name)[i].as_py()
                reason = f"unparsable value {raw!r} in column '{name}'"
                return BadRow(row, BadKind.UNPARSABLE, reason, record, name)
            value = tensor[i, j] if binding.matrix else tensor[i]
            if binding.spec.allow_nonfinite or np.isfinite(value):
                continue
            if column.nulls is not None and column.nulls[i]:
                reason = f"missing value in column '{name}'"
                return BadRow(row, BadKind.MISSING, reason, record, name)
            reason = (
                f"non-finite value {float(value)} in column '{name}' "
                f"(model '{plan.model}' does not accept NaN or infinity)"
            )
            return BadRow(row, BadKind.NONFINITE, reason, record, name)
    return BadRow(row, BadKind.UNPARSABLE, "row could not be converted", record)


def output_batch(
    plan: ScoringPlan, kept: pa.RecordBatch, outputs: Mapping[str, np.ndarray]
) -> pa.RecordBatch:
    """Kept columns, one column per output (2-D outputs split by index), model and version."""
    n = kept.num_rows
    arrays: list[pa.Array] = list(kept.columns)
    for binding in plan.outputs:
        tensor = outputs[binding.spec.name]
        if tensor.ndim == 1:
            arrays.append(_to_arrow(tensor, binding.arrow_type))
        else:
            arrays += [_to_arrow(tensor[:, k], binding.arrow_type) for k in range(tensor.shape[1])]
    arrays.append(arrow.constant_text(plan.model, n))
    arrays.append(arrow.constant_int(plan.version, n))
    return pa.RecordBatch.from_arrays(arrays, schema=plan.output_schema)


def _to_arrow(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    if values.dtype == object:
        return pa.array(
            [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values], kind
        )
    return arrow.array(values, kind)
