"""Numeric columns read and built through their buffers equal pyarrow's own conversions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from server.batch import columns

NUMERIC = [
    pa.float16(), pa.float32(), pa.float64(), pa.int8(), pa.int16(), pa.int32(), pa.int64(),
    pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(),
]  # fmt: skip


def sample(kind: pa.DataType, with_nulls: bool) -> pa.Array:
    """37 values of ``kind``, every fifth null when asked, sliced off-byte (offset 3)."""
    values = [None if with_nulls and i % 5 == 0 else i % 100 for i in range(40)]
    return pa.array(values, type=kind).slice(3, 37)


@pytest.mark.parametrize("kind", NUMERIC, ids=str)
@pytest.mark.parametrize("with_nulls", [False, True], ids=["dense", "nulls"])
def test_values_and_nulls_match_pyarrow(kind: pa.DataType, with_nulls: bool) -> None:
    col = sample(kind, with_nulls)
    expected = col.to_numpy(zero_copy_only=False)
    got = columns.values(col)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)  # NaN where null, in float columns
    missing = columns.nulls(col)
    if with_nulls:
        assert missing is not None
        assert missing.tolist() == col.is_null().to_pylist()
    else:
        assert missing is None


def test_values_of_an_empty_column_and_of_another_type() -> None:
    assert columns.values(pa.array([], pa.float32())).shape == (0,)
    assert columns.values(pa.array([True, False])).tolist() == [True, False]


@pytest.mark.parametrize("kind", NUMERIC, ids=str)
def test_array_equals_pa_array(kind: pa.DataType) -> None:
    data = np.arange(0, 50, 3, dtype=np.float64)[::2]  # strided, and another dtype than kind
    assert columns.array(data, kind).equals(pa.array(data, type=kind))


def test_array_keeps_nan_as_a_value_not_a_null() -> None:
    built = columns.array(np.array([0.5, np.nan], dtype=np.float32), pa.float32())
    assert built.null_count == 0
    assert np.isnan(built.to_numpy()[1])


def test_constant_columns() -> None:
    assert columns.constant_text("fraud", 3).equals(pa.array(["fraud"] * 3, pa.string()))
    assert columns.constant_text("", 2).equals(pa.array(["", ""], pa.string()))
    assert columns.constant_int(7, 4).equals(pa.array([7] * 4, pa.int64()))
