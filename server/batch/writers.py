"""Safe output: everything goes to temporary files, renamed into place only when complete.

Text formats (CSV, JSON Lines) append to one temporary file and record its
length after each chunk; a resumed run truncates back to that length. Parquet
streams into one temporary file and also keeps each chunk as an Arrow part,
from which a resumed run rebuilds what it cannot append to.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from server.batch.errors import BatchUsageError
from server.batch.features import MODEL_VERSION_COLUMN, BadRow
from server.batch.job import Format


@dataclass(frozen=True, slots=True)
class WorkPaths:
    """The files a run keeps beside its output until it completes."""

    output: Path

    def _beside(self, suffix: str) -> Path:
        return self.output.with_name(self.output.name + suffix)

    @property
    def manifest(self) -> Path:
        return self._beside(".sluice-manifest.json")

    @property
    def temp(self) -> Path:
        return self._beside(".sluice-tmp")

    @property
    def parts(self) -> Path:
        return self._beside(".sluice-parts")

    def remove(self) -> None:
        """Forget a run: temporary output, parts and manifest."""
        shutil.rmtree(self.parts, ignore_errors=True)
        for path in (self.temp, self.manifest):
            path.unlink(missing_ok=True)


class OutputWriter(Protocol):
    def write(self, batch: pa.RecordBatch) -> None: ...

    def checkpoint(self) -> int:
        """Make everything written so far durable; returns the state to resume from."""
        ...

    def commit(self) -> None:
        """Finish the file and move it into place."""
        ...

    def close(self) -> None: ...


def _fsync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _open_append(path: Path, resume_at: int | None) -> IO[bytes]:
    """A fresh file, or the existing one cut back to ``resume_at`` bytes."""
    if resume_at is None:
        return path.open("wb")
    if not path.is_file() or path.stat().st_size < resume_at:
        raise BatchUsageError(
            f"cannot resume: {path} is missing or shorter than the manifest says; "
            "run without --resume to start over"
        )
    handle = path.open("r+b")
    handle.truncate(resume_at)
    handle.seek(resume_at)
    return handle


class TextWriter:
    """CSV or JSON Lines, appended to one temporary file."""

    def __init__(
        self, paths: WorkPaths, fmt: Format, schema: pa.Schema, resume_at: int | None
    ) -> None:
        self._paths = paths
        self._fmt = fmt
        self._handle = _open_append(paths.temp, resume_at)
        if resume_at is None and fmt is Format.CSV:
            pacsv.write_csv(schema.empty_table(), self._handle)

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._fmt is Format.CSV:
            pacsv.write_csv(batch, self._handle, pacsv.WriteOptions(include_header=False))
        else:
            self._handle.write(jsonl_lines(batch))

    def checkpoint(self) -> int:
        _fsync(self._handle)
        return self._handle.tell()

    def commit(self) -> None:
        _fsync(self._handle)
        self._handle.close()
        os.replace(self._paths.temp, self._paths.output)

    def close(self) -> None:
        self._handle.close()


class ParquetWriter:
    """Streams row groups into one temporary Parquet file, with an Arrow IPC part per chunk.

    A Parquet file cannot be reopened for appending, so each completed chunk is
    also kept as a cheap uncompressed Arrow file; a resumed run rebuilds the
    Parquet file from those parts and carries on. The parts go at commit.
    """

    def __init__(self, paths: WorkPaths, schema: pa.Schema, resume_at: int | None) -> None:
        self._paths = paths
        self._schema = schema
        self._parts = 0 if resume_at is None else resume_at
        if resume_at is None:
            shutil.rmtree(paths.parts, ignore_errors=True)
        paths.parts.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(self._parts) if not self._part(i).is_file()]
        if missing:
            raise BatchUsageError(
                f"cannot resume: part {missing[0]} of {paths.output} is missing from "
                f"{paths.parts}; run without --resume to start over"
            )
        for stale in paths.parts.glob("part-*.arrow"):
            if int(stale.stem.split("-")[1]) >= self._parts:
                stale.unlink()
        self._handle = paths.temp.open("wb")
        self._writer = pq.ParquetWriter(self._handle, schema, use_dictionary=_dictionary(schema))
        for index in range(self._parts):
            with pa.OSFile(str(self._part(index))) as source:
                self._writer.write_table(pa.ipc.open_file(source).read_all())
        self._pending: list[pa.RecordBatch] = []

    def _part(self, index: int) -> Path:
        return self._paths.parts / f"part-{index:06d}.arrow"

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._pending.append(batch)

    def checkpoint(self) -> int:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self._schema)
            partial = self._paths.parts / "writing.arrow"
            with partial.open("wb") as handle:
                with pa.ipc.new_file(handle, self._schema) as part:
                    part.write_table(table)
                _fsync(handle)
            os.replace(partial, self._part(self._parts))
            self._writer.write_table(table)
            self._parts += 1
            self._pending = []
        return self._parts

    def commit(self) -> None:
        self.checkpoint()
        self._writer.close()
        _fsync(self._handle)
        self._handle.close()
        os.replace(self._paths.temp, self._paths.output)
        shutil.rmtree(self._paths.parts, ignore_errors=True)

    def close(self) -> None:
        self._pending = []
        self._writer.close()
        self._handle.close()


def _dictionary(schema: pa.Schema) -> list[str] | bool:
    """Dictionary-encode text and the constant version column; hashing scores and ids is waste."""
    names = [
        f.name
        for f in schema
        if pa.types.is_string(f.type)
        or pa.types.is_large_string(f.type)
        or pa.types.is_dictionary(f.type)
        or f.name == MODEL_VERSION_COLUMN
    ]
    return names or False


def open_writer(
    paths: WorkPaths, fmt: Format, schema: pa.Schema, resume_at: int | None
) -> OutputWriter:
    if fmt is Format.PARQUET:
        return ParquetWriter(paths, schema, resume_at)
    return TextWriter(paths, fmt, schema, resume_at)


class QuarantineWriter:
    """Bad rows with their reasons, one JSON object per line; renamed into place at the end."""

    def __init__(self, path: Path, resume_at: int | None) -> None:
        self.path = path
        self._temp = path.with_name(path.name + ".sluice-tmp")
        self._handle = _open_append(self._temp, resume_at)

    def write(self, rows: list[BadRow]) -> None:
        for bad in rows:
            doc: dict[str, Any] = {"_row": bad.row, "_error": bad.reason, **bad.record}
            self._handle.write(orjson.dumps(doc, default=str, option=orjson.OPT_APPEND_NEWLINE))

    def checkpoint(self) -> int:
        _fsync(self._handle)
        return self._handle.tell()

    def commit(self) -> None:
        _fsync(self._handle)
        self._handle.close()
        os.replace(self._temp, self.path)

    def close(self) -> None:
        self._handle.close()

    def discard(self) -> None:
        self._handle.close()
        self._temp.unlink(missing_ok=True)


def jsonl_lines(batch: pa.RecordBatch) -> bytes:
    """Rows as JSON objects; FP32 values are written in their shortest exact form."""
    columns = []
    for column in batch.columns:
        if pa.types.is_float32(column.type) and not column.null_count:
            # '0.1' rather than the widened 0.10000000149011612; both read back as the same FP32.
            values = column.to_numpy().astype(str).astype(np.float64).tolist()
        else:
            values = column.to_pylist()
        columns.append(values)
    names = batch.schema.names
    return b"".join(
        orjson.dumps(dict(zip(names, row, strict=True)), option=orjson.OPT_APPEND_NEWLINE)
        for row in zip(*columns, strict=True)
    )
