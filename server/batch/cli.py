"""``sluice batch``: score a file with a model of the repository, locally or on Ray."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from server.batch.errors import BatchError, BatchUsageError
from server.batch.job import (
    BatchJob,
    Engine,
    Format,
    KeepColumns,
    OnError,
    detect_format,
    parse_model_ref,
)
from server.config import ConfigError, Settings, load_settings
from server.errors import ServingError

if TYPE_CHECKING:
    from server.batch.summary import BatchSummary

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger("sluice.batch")


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``batch`` on the ``sluice`` subcommands."""
    batch: argparse.ArgumentParser = commands.add_parser(
        "batch",
        help="score a CSV, Parquet or JSON Lines file offline",
        description="Score a file with the same core, validation and runtime as `sluice serve`.",
    )
    formats = [f.value for f in Format]
    batch.add_argument("--config", type=Path, metavar="PATH", help="YAML settings file")
    batch.add_argument("--model-repository", type=Path, metavar="DIR", help="model repository root")
    batch.add_argument(
        "--model",
        required=True,
        metavar="NAME[:VERSION]",
        help="NAME or NAME:VERSION (default: latest)",
    )
    batch.add_argument("--input", type=Path, required=True, metavar="PATH", help="file to score")
    batch.add_argument(
        "--output", type=Path, required=True, metavar="PATH", help="scored file (directory: ray)"
    )
    batch.add_argument("--format", choices=formats, help="input format (default: extension)")
    batch.add_argument("--output-format", choices=formats, help="default: output extension")
    batch.add_argument(
        "--keep-columns", metavar="A,B|all", help="input columns copied to the output"
    )
    batch.add_argument(
        "--on-error",
        choices=[o.value for o in OnError],
        default=OnError.FAIL.value,
        help="a row that cannot be scored stops the run, is skipped, or is quarantined",
    )
    batch.add_argument(
        "--quarantine",
        type=Path,
        metavar="PATH",
        help="bad rows file (default: OUTPUT.quarantine.jsonl)",
    )
    batch.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its manifest"
    )
    batch.add_argument(
        "--summary", type=Path, metavar="PATH", help="write the JSON summary here ('-': stdout)"
    )
    batch.add_argument("--chunk-rows", type=int, metavar="N", default=65_536, help="rows per chunk")
    batch.add_argument("--inference-threads", type=int, metavar="N", help="model thread pool size")
    batch.add_argument("--engine", choices=[e.value for e in Engine], default=Engine.LOCAL.value)
    batch.add_argument(
        "--ray-address", metavar="ADDRESS", help="join this Ray cluster (default: start one)"
    )
    batch.add_argument(
        "--ray-actors", type=int, metavar="N", help="scoring actors (default: CPUs - 1)"
    )
    batch.add_argument(
        "--drift-report",
        type=Path,
        metavar="PATH",
        help="drift of the scored file against the reference",
    )
    batch.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal, else log lines)",
    )
    batch.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return batch


def build_job(args: argparse.Namespace, settings: Settings) -> BatchJob:
    """Validate the arguments into a job; every mistake is a BatchUsageError."""
    model, version = parse_model_ref(args.model)
    engine = Engine(args.engine)
    on_error = OnError(args.on_error)
    input_format = detect_format(args.input, args.format, "input")
    output_format = (
        Format(args.output_format)
        if args.output_format
        else detect_format(args.output, None, "output")
        if args.output.suffix
        else input_format
    )
    if args.input.resolve() == args.output.resolve():
        raise BatchUsageError("--output must not be the input file")
    if engine is Engine.LOCAL and args.output.is_dir():
        raise BatchUsageError(f"--output {args.output} is a directory (a Ray run's output?)")
    if not args.output.parent.resolve().is_dir():
        raise BatchUsageError(f"--output: directory {args.output.parent} does not exist")
    if args.chunk_rows < 1:
        raise BatchUsageError(f"--chunk-rows must be at least 1, got {args.chunk_rows}")
    if args.quarantine is not None and on_error is not OnError.QUARANTINE:
        raise BatchUsageError("--quarantine PATH needs --on-error quarantine")
    if engine is Engine.RAY and args.resume:
        raise BatchUsageError(
            "--resume applies to the local engine; Ray Data retries failed tasks itself"
        )
    if engine is Engine.RAY and args.drift_report is not None:
        raise BatchUsageError("--drift-report needs the local engine (--engine local)")
    if engine is Engine.LOCAL and (args.ray_address or args.ray_actors):
        raise BatchUsageError("--ray-address and --ray-actors need --engine ray")
    return BatchJob(
        settings=settings,
        model=model,
        version=version,
        input=args.input,
        output=args.output,
        input_format=input_format,
        output_format=output_format,
        keep=KeepColumns.parse(args.keep_columns),
        on_error=on_error,
        quarantine=args.quarantine,
        chunk_rows=args.chunk_rows,
        resume=args.resume,
        summary=args.summary,
        drift_report=args.drift_report,
        engine=engine,
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
        progress=args.progress,
    )


def execute(job: BatchJob) -> BatchSummary:
    """Run the job on its engine; returns the BatchSummary."""
    from server.batch.progress import make_progress

    progress = make_progress(f"{job.model} {job.input.name}", job.progress)
    try:
        if job.engine is Engine.RAY:
            from server.batch.engine_ray import run_ray

            return run_ray(job, progress).finish()
        from server.batch.engine_local import run_local

        return asyncio.run(run_local(job, progress)).finish()
    finally:
        progress.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sluice batch``; returns the exit code."""
    try:
        settings = load_settings(
            args.config,
            flags={
                "model_repository": args.model_repository,
                "inference_threads": args.inference_threads,
                "log_level": args.log_level,
            },
        )
    except ConfigError as exc:
        print(f"sluice batch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        job = build_job(args, settings)
        summary = execute(job)
    except (BatchError, ServingError) as exc:
        print(f"sluice batch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            f"sluice batch: interrupted; completed chunks are kept, "
            f"rerun with --resume to continue {args.output}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(summary.line(), file=sys.stderr)
    if job.summary is not None:
        if str(job.summary) == "-":
            sys.stdout.write(summary.to_json())
        else:
            summary.write(job.summary)
    return 0
