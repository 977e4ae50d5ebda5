"""The batch benchmark's hand-written contender: scoring a file without Sluice.

    python loadtest/benchmarks/batch_script.py BOOSTER INPUT OUTPUT [--keep COLUMN]
        [--chunk-rows 65536] [--threads 2] [--model-name NAME] [--model-version V]

What a user would write with pyarrow and XGBoost alone, strictly in sequence:
read a chunk, predict it, write it, then the next. The features are the
booster's own ``feature_names``, as float32. The output has the columns
``sluice batch --keep-columns COLUMN`` writes (the kept column, the
probability, ``model_name``, ``model_version``), so both write the same bytes.
It imports neither Sluice nor anything else, and is run by path.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xgboost as xgb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="score a Parquet file with an XGBoost booster")
    parser.add_argument("booster", help="model.ubj or model.json")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--keep", help="input column copied to the output")
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-name", default="fraud")
    parser.add_argument("--model-version", type=int, default=0)
    args = parser.parse_args(argv)

    booster = xgb.Booster(model_file=args.booster)
    booster.set_param({"nthread": args.threads})
    features = list(booster.feature_names or [])
    kept = [args.keep] if args.keep else []
    source = pq.ParquetFile(args.input)
    schema = pa.schema(
        [source.schema_arrow.field(c) for c in kept]
        + [
            pa.field("probability", pa.float32()),
            pa.field("model_name", pa.string()),
            pa.field("model_version", pa.int64()),
        ]
    )
    with pq.ParquetWriter(args.output, schema) as writer:
        for batch in source.iter_batches(batch_size=args.chunk_rows, columns=features + kept):
            rows = np.column_stack([batch.column(name).to_numpy() for name in features]).astype(
                np.float32
            )
            scores = booster.inplace_predict(rows).astype(np.float32)
            n = batch.num_rows
            columns = [batch.column(c) for c in kept] + [
                pa.array(scores),
                pa.repeat(pa.scalar(args.model_name, pa.string()), n),
                pa.repeat(pa.scalar(args.model_version, pa.int64()), n),
            ]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
    return 0


if __name__ == "__main__":
    sys.exit(main())
