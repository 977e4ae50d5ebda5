"""Streaming readers: CSV, Parquet and JSON Lines in chunks, restartable at a position.

Memory stays flat: a reader holds one chunk (plus Arrow's read-ahead) whatever
the file size. Every reader reports rows it could not parse as ``BadRow``
instead of dying, and can start again from a ``Position`` saved by a run that
stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from server.batch.errors import BatchUsageError
from server.batch.features import BadKind, BadRow
from server.batch.job import Format

# A run from the top scores its first rows in a chunk of at most this many, so they are
# in the output (and a broken output found) a tenth of a second sooner at 65,536-row
# chunks; the rest come at ``--chunk-rows``. Resumed runs keep the full size throughout.
FIRST_CHUNK_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Position:
    """How far a run got: data rows consumed, and format-specific bookmarks."""

    rows: int = 0
    malformed: int = 0
    last_malformed_line: int = 0
    byte_offset: int = 0


@dataclass(slots=True)
class InputChunk:
    """Rows read in one step; ``row_ids`` is None when they are consecutive from ``first_row``."""

    batch: pa.RecordBatch
    first_row: int
    bad: list[BadRow]
    end: Position
    progress: float | None
    row_ids: np.ndarray | None = None

    @property
    def rows_read(self) -> int:
        return int(self.batch.num_rows) + len(self.bad)


class ChunkReader(Protocol):
    """Opened on a file: ``schema`` is known at once, ``start`` begins streaming."""

    schema: pa.Schema
    total_rows: int | None

    def start(self, columns: Sequence[str], at: Position) -> None: ...

    def read(self) -> InputChunk | None: ...

    def close(self) -> None: ...


def open_reader(path: Path, fmt: Format, features: Sequence[str], chunk_rows: int) -> ChunkReader:
    """A reader for ``path``; raises BatchUsageError if the file cannot be opened as ``fmt``."""
    if not path.is_file():
        raise BatchUsageError(f"input file {path} does not exist")
    readers: dict[Format, type[CsvReader | ParquetReader | JsonlReader]] = {
        Format.CSV: CsvReader,
        Format.PARQUET: ParquetReader,
        Format.JSONL: JsonlReader,
    }
    try:
        return readers[fmt](path, features, chunk_rows)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BatchUsageError(f"cannot read {path} as {fmt.value}: {exc}") from exc


class ParquetReader:
    """Row-group aware: a restart seeks to the row group holding the next row."""

    def __init__(self, path: Path, features: Sequence[str], chunk_rows: int) -> None:
        # A buffered stream reads a row group piece by piece, so memory does not
        # scale with row-group size (often 128 MiB or more) either.
        self._file = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
        self._chunk_rows = chunk_rows
        self.schema: pa.Schema = self._file.schema_arrow
        self.total_rows: int | None = self._file.metadata.num_rows
        self._batches: Any = iter(())
        self._skip = 0
        self._rows = 0
        self._head: Any = None  # a run from the top: its short first chunk

    def start(self, columns: Sequence[str], at: Position) -> None:
        metadata = self._file.metadata
        first, begin = metadata.num_row_groups, at.rows
        offset = 0
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            if offset + size > at.rows:
                first, begin = group, offset
                break
            offset += size
        self._skip = at.rows - begin
        self._rows = at.rows
        groups = list(range(first, metadata.num_row_groups))
        self._batches = self._iterate(groups, columns, self._chunk_rows)
        # Read on its own, so that its few rows are all that is decoded before they are
        # scored; the full-size batches then skip them.
        short = at.rows == 0 and self._chunk_rows > FIRST_CHUNK_ROWS
        self._head = self._iterate(groups[:1], columns, FIRST_CHUNK_ROWS) if short else None

    def _iterate(self, groups: list[int], columns: Sequence[str], rows: int) -> Any:
        if not groups:
            return iter(())
        return self._file.iter_batches(
            batch_size=rows, row_groups=groups, columns=list(columns), use_threads=False
        )

    def read(self) -> InputChunk | None:
        batch = self._next()
        if batch is None:
            return None
        first = self._rows
        self._rows += batch.num_rows
        total = self.total_rows or 1
        return InputChunk(batch, first, [], Position(rows=self._rows), self._rows / total)

    def _next(self) -> pa.RecordBatch | None:
        if self._head is not None:
            batch = next(self._head, None)
            self._head = None
            if batch is not None and batch.num_rows:
                self._skip = batch.num_rows
                return batch
        for batch in self._batches:
            if self._skip >= batch.num_rows:
                self._skip -= batch.num_rows
                continue
            if self._skip:
                batch, self._skip = batch.slice(self._skip), 0
            return batch
        return None

    def close(self) -> None:
        self._file.close()


class CsvReader:
    """Every column is read as text, so a bad value is a bad row and not a dead job.

    Columns pass through exactly as written. A malformed line (wrong number of
    fields) becomes a bad row that names its line number. A restart re-reads
    the file up to the saved position rather than trusting line counts.
    """

    def __init__(self, path: Path, features: Sequence[str], chunk_rows: int) -> None:
        self._path = path
        with pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 20),
            parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
        ) as head:
            names = head.schema.names
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise BatchUsageError(f"{path}: the header names column '{duplicates[0]}' twice")
        self.schema = pa.schema([pa.field(n, pa.string()) for n in names])
        self.total_rows: int | None = None
        self._block_size = _block_size(path, chunk_rows)
        self._handle: IO[bytes] | None = None
        self._reader: Any = None
        self._pending: list[BadRow] = []
        self._size = max(path.stat().st_size, 1)
        self._rows = 0
        self._skip = 0
        self._malformed = 0
        self._handled_line = 0
        self._last_line = 0

    def _on_invalid(self, row: Any) -> str:
        number = int(row.number) if row.number is not None else -1
        if number > self._handled_line or number < 0:
            self._malformed += 1
            self._last_line = max(self._last_line, number)
            self._pending.append(
                BadRow(
                    None,
                    BadKind.MALFORMED,
                    f"malformed CSV row at line {number}: expected {row.expected_columns} "
                    f"fields, got {row.actual_columns}",
                    {"_line": number, "_raw": row.text},
                )
            )
        return "skip"

    def start(self, columns: Sequence[str], at: Position) -> None:
        self._rows, self._skip = 0, at.rows
        self._malformed = at.malformed
        self._handled_line = self._last_line = at.last_malformed_line
        self._handle = self._path.open("rb")
        self._reader = pacsv.open_csv(
            self._handle,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=self._block_size),
            parse_options=pacsv.ParseOptions(invalid_row_handler=self._on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns},
                include_columns=list(columns),
                strings_can_be_null=False,
            ),
        )

    def read(self) -> InputChunk | None:
        while True:
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                if not self._pending:
                    return None
                batch = pa.RecordBatch.from_pylist([], schema=self._reader.schema)
            if self._skip:
                if self._skip >= batch.num_rows:
                    self._skip -= batch.num_rows
                    self._rows += batch.num_rows
                    continue
                self._rows += self._skip
                batch, self._skip = batch.slice(self._skip), 0
            bad, self._pending = self._pending, []
            first = self._rows
            self._rows += batch.num_rows
            assert self._handle is not None
            end = Position(self._rows, self._malformed, self._last_line)
            return InputChunk(batch, first, bad, end, min(self._handle.tell() / self._size, 1.0))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _block_size(path: Path, chunk_rows: int) -> int:
    """Arrow's CSV block size for about ``chunk_rows`` rows, and room for the longest row."""
    with path.open("rb") as handle:
        sample = handle.read(1 << 20)
    lines = sample.split(b"\n")
    per_row = max(len(sample) // max(len(lines), 1), 1)
    longest = max(len(line) for line in lines) + 1
    return int(min(max(per_row * chunk_rows, 8 * longest, 1 << 14), 1 << 28))


class JsonlReader:
    """One JSON object per line, read in line-aligned chunks with exact byte offsets.

    Feature fields are read as numbers and kept fields keep the types seen in
    the first chunk. A line that does not fit (invalid JSON, a string where a
    number belongs) is isolated by bisection and becomes a bad row.
    """

    def __init__(self, path: Path, features: Sequence[str], chunk_rows: int) -> None:
        self._path = path
        self._features = tuple(features)
        self._chunk_rows = chunk_rows
        self.total_rows: int | None = None
        self._size = max(path.stat().st_size, 1)
        with path.open("rb") as handle:
            head = list(itertools.islice(handle, min(chunk_rows, 10_000)))
        head = [line for line in head if line.strip()]
        # An empty file still scores to an empty output with the model's columns.
        empty = pa.schema([pa.field(n, pa.float64()) for n in self._features])
        self.schema = _discover(path, head) if head else empty
        for name in self._features:
            if name in self.schema.names and _is_text(self.schema.field(name).type):
                raise BatchUsageError(
                    f"column '{name}' in {path} holds strings, not JSON numbers, "
                    "in the first rows; is it the right column?"
                )
        # Features are read as numbers whatever the first chunk looked like.
        self.schema = pa.schema(
            [pa.field(f.name, pa.float64()) if f.name in self._features else f for f in self.schema]
        )
        self._options: pajson.ParseOptions | None = None
        self._handle: IO[bytes] | None = None
        self._rows = 0
        self._offset = 0

    def start(self, columns: Sequence[str], at: Position) -> None:
        self._options = jsonl_options(self.schema, self._features, columns)
        self._handle = self._path.open("rb")
        self._handle.seek(at.byte_offset)
        self._rows, self._offset = at.rows, at.byte_offset

    def read(self) -> InputChunk | None:
        assert self._handle is not None
        assert self._options is not None
        lines = list(itertools.islice(self._handle, self._chunk_rows))
        if not lines:
            return None
        self._offset += sum(len(line) for line in lines)
        first = self._rows
        batch, row_ids, bad = parse_jsonl(lines, first, self._features, self._options)
        self._rows += batch.num_rows + len(bad)
        end = Position(rows=self._rows, byte_offset=self._offset)
        return InputChunk(batch, first, bad, end, min(self._offset / self._size, 1.0), row_ids)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def jsonl_options(
    schema: pa.Schema, features: Sequence[str], columns: Sequence[str]
) -> pajson.ParseOptions:
    """Feature fields as numbers, kept fields as first seen, every other field ignored."""
    fields = [pa.field(c, pa.float64()) if c in features else schema.field(c) for c in columns]
    return pajson.ParseOptions(
        explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"
    )


def parse_jsonl(
    lines: Sequence[bytes], first_row: int, features: Sequence[str], options: pajson.ParseOptions
) -> tuple[pa.RecordBatch, np.ndarray, list[BadRow]]:
    """Parse JSON lines into one batch; lines that do not fit become bad rows."""
    records = [line if line.endswith(b"\n") else line + b"\n" for line in lines]
    records = [line for line in records if line.strip()]
    segments, failed = _parse(records, 0, options)
    bad = [_diagnose(records[i], first_row + i, features) for i in failed]
    if not segments:
        return _empty(options), np.zeros(0, dtype=np.int64), bad
    table = pa.concat_tables([t for _, t in segments]).combine_chunks()
    batch = table.to_batches()[0] if table.num_rows else _empty(options)
    row_ids = np.concatenate(
        [np.arange(first_row + s, first_row + s + t.num_rows) for s, t in segments]
    )
    return batch, row_ids, bad


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _empty(options: pajson.ParseOptions) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=options.explicit_schema)


def _read_json(records: Sequence[bytes], options: pajson.ParseOptions) -> pa.Table:
    block = b"".join(records)
    return pajson.read_json(
        pa.BufferReader(block),
        read_options=pajson.ReadOptions(use_threads=False, block_size=max(len(block), 1 << 16)),
        parse_options=options,
    )


def _parse(
    records: Sequence[bytes], start: int, options: pajson.ParseOptions
) -> tuple[list[tuple[int, pa.Table]], list[int]]:
    """Parse lines; on failure split in halves until each bad line stands alone."""
    if not records:
        return [], []
    try:
        return [(start, _read_json(records, options))], []
    except pa.ArrowInvalid:
        if len(records) == 1:
            return [], [start]
    middle = len(records) // 2
    left, left_bad = _parse(records[:middle], start, options)
    right, right_bad = _parse(records[middle:], start + middle, options)
    return left + right, left_bad + right_bad


def _discover(path: Path, head: Sequence[bytes]) -> pa.Schema:
    segments, _ = _parse(head, 0, pajson.ParseOptions())
    schemas = [t.schema for _, t in segments if t.num_rows]
    if not schemas:
        return pa.schema([])
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return schemas[0]


def _diagnose(line: bytes, row: int, features: Sequence[str]) -> BadRow:
    text = line.decode("utf-8", "replace").rstrip("\n")
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return BadRow(row, BadKind.MALFORMED, f"not valid JSON: {exc}", {"_raw": text})
    if not isinstance(doc, dict):
        return BadRow(row, BadKind.MALFORMED, "not a JSON object", {"_raw": text})
    for name in features:
        value = doc.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return BadRow(
                row,
                BadKind.UNPARSABLE,
                f"unparsable value {value!r} in column '{name}' (expected a JSON number)",
                doc,
                name,
            )
    return BadRow(row, BadKind.UNPARSABLE, "a value does not fit its column's type", doc)
