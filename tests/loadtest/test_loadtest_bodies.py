"""Request bodies: what a V2 server decodes from them, from random data and from rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_v2_server import decode_request
from loadtest_support import fake_server

from loadtest import (
    BodySpec,
    DataError,
    ExpectedOutputs,
    ModelMetadata,
    OutputChecker,
    Target,
    Tensor,
    TensorMeta,
    build_pool,
    fetch_metadata,
    load_expected,
    rows_pool,
    run_closed,
)
from loadtest.encoding import encode_binary, encode_json


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with fake_server() as url:
        yield url


def split_request(request: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return headers, body


def decoded(request: bytes) -> dict[str, np.ndarray[Any, Any]]:
    headers, body = split_request(request)
    length = headers.get("inference-header-content-length")
    return decode_request(body, int(length) if length else None)


MIXED = [
    Tensor("a", "FP32", np.array([[0.1, -2.5, 3e-8], [4.0, 5.5, -6.25]], dtype=np.float32)),
    Tensor("b", "INT64", np.array([[1, -(2**40)], [3, 4]], dtype=np.int64)),
    Tensor("c", "BOOL", np.array([[True], [False]])),
    Tensor("d", "FP16", np.array([[0.5, -1.0], [65504.0, 0.099975586]], dtype=np.float16)),
    Tensor("e", "BYTES", np.array([[b"abc"], ["h\u00e9"]], dtype=object)),
]


@pytest.mark.parametrize("encode", [encode_json, encode_binary])
def test_every_datatype_decodes_to_the_same_tensors(encode: Any) -> None:
    body = encode(MIXED)

    tensors = decode_request(body.data, body.json_length)

    for t in MIXED:
        got = tensors[t.name]
        assert got.shape == t.array.shape
        if t.datatype == "BYTES":
            want = [v if isinstance(v, bytes) else v.encode() for v in t.array.reshape(-1)]
            assert list(got.reshape(-1)) == want
        else:
            np.testing.assert_array_equal(got, t.array)


@pytest.mark.parametrize("binary", [False, True])
async def test_random_bodies_follow_the_metadata_and_the_server_accepts_them(
    fake_url: str, binary: bool
) -> None:
    target = Target.from_url(fake_url, "mixed")
    meta = await fetch_metadata(target)
    pool = build_pool(target, meta, BodySpec(rows_per_request=3, binary=binary, pool_size=4))

    assert len(pool.requests) == 4
    for request in pool.requests:
        assert request.startswith(b"POST /v2/models/mixed/infer HTTP/1.1\r\n")
        headers, _ = split_request(request)
        assert ("inference-header-content-length" in headers) is binary
        shapes = {name: t.shape for name, t in decoded(request).items()}
        assert shapes == {"a": (3, 3), "b": (3, 2), "c": (3, 1), "d": (3, 2), "e": (3, 1)}
    result = await run_closed(target, pool, concurrency=2, duration=0.3)
    assert result.statuses == {200: result.completed}


def test_rows_without_feature_names_use_numeric_columns_in_order(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("w,label,x,name,y,z\n1,0,2,p,3,4\n5,1,6,q,7,8\n9,0,10,r,11,12\n")
    target = Target("127.0.0.1", 1, "m")
    meta = ModelMetadata("m", (TensorMeta("features", "FP32", (-1, 4)),), ())
    pool = build_pool(target, meta, BodySpec(rows_per_request=2), path)

    # 3 rows, 2 per request: the second request wraps around to the first row.
    assert [ids.tolist() for ids in pool.row_ids or ()] == [[0, 1], [2, 0]]
    np.testing.assert_array_equal(
        decoded(pool.requests[1])["features"], [[9, 10, 11, 12], [1, 2, 3, 4]]
    )


def test_rows_missing_a_feature_column_are_refused(tmp_path: Path) -> None:
    meta = ModelMetadata("m", (TensorMeta("f", "FP32", (-1, 2), ("a", "zz")),), ())
    table = pa.table({"a": [1.0], "b": [2.0]})
    with pytest.raises(DataError, match="zz"):
        rows_pool(Target("127.0.0.1", 1, "m"), meta, table, BodySpec())


@pytest.mark.parametrize(("binary", "binary_output"), [(False, False), (True, True)])
async def test_rows_match_feature_names_and_outputs_are_checked(
    fake_url: str, tmp_path: Path, binary: bool, binary_output: bool
) -> None:
    # "named" takes features c, a, b (from its Triton config) and echoes them back.
    rows = pa.table({"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0], "c": [7.0, 8.0, 9.0]})
    pq.write_table(rows, tmp_path / "rows.parquet")
    target = Target.from_url(fake_url, "named")
    meta = await fetch_metadata(target)
    assert meta.inputs[0].feature_names == ("c", "a", "b")
    spec = BodySpec(rows_per_request=2, binary=binary, binary_output=binary_output)
    pool = build_pool(target, meta, spec, tmp_path / "rows.parquet")
    np.testing.assert_array_equal(decoded(pool.requests[0])["features"], [[7, 1, 10], [8, 2, 20]])

    echo = {"features": [[7, 1, 10], [8, 2, 20], [9, 3, 30]]}
    right = OutputChecker(ExpectedOutputs({k: np.array(v, float) for k, v in echo.items()}))
    wrong = OutputChecker(ExpectedOutputs({"features": np.zeros((3, 3))}))
    good = await run_closed(target, pool, concurrency=2, duration=0.3, checker=right)
    bad = await run_closed(target, pool, concurrency=2, duration=0.3, checker=wrong)

    assert good.checked == good.ok > 0
    assert good.mismatches == 0
    assert bad.mismatches == bad.checked == bad.ok > 0


def test_expected_outputs_load_from_json_and_tables(tmp_path: Path) -> None:
    (tmp_path / "e.json").write_text('{"score": [0.1, 0.2], "vec": [[1, 2], [3, 4]]}')
    pq.write_table(pa.table({"vec_1": [2, 4], "vec_0": [1, 3]}), tmp_path / "e.parquet")
    (tmp_path / "e.csv").write_text("p\n0.5\n0.25\n")

    from_json = load_expected(tmp_path / "e.json", ["score", "vec"])
    from_parquet = load_expected(tmp_path / "e.parquet", ["score", "vec"])
    single = load_expected(tmp_path / "e.csv", ["probability"])

    assert from_json.values["score"].shape == (2, 1)
    np.testing.assert_array_equal(from_json.values["vec"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(from_parquet.values["vec"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(single.values["probability"], [[0.5], [0.25]])
