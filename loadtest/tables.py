"""Reading tabular files (Parquet, CSV) into Arrow, with errors the CLI can report."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from loadtest.errors import DataError

LABEL_COLUMN = "label"


def read_table(path: Path) -> pa.Table:
    """A Parquet (``.parquet``/``.pq``) or CSV (anything else) file as one Arrow table."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def numeric_columns(table: pa.Table) -> list[str]:
    """Numeric and boolean columns in file order, the ``label`` column left out."""
    return [
        field.name
        for field in table.schema
        if field.name != LABEL_COLUMN
        and (
            pa.types.is_integer(field.type)
            or pa.types.is_floating(field.type)
            or pa.types.is_boolean(field.type)
        )
    ]
