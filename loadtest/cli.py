"""``python -m loadtest URL MODEL [options]``: the command line over the library."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from loadtest import report
from loadtest.bodies import BodySpec, RequestPool, build_pool
from loadtest.check import OutputChecker, load_expected
from loadtest.compare import Arm, run_compare
from loadtest.errors import DataError, LoadTestError, TargetUnreachable, UsageError
from loadtest.openloop import ARRIVALS
from loadtest.runner import DEFAULT_TIMEOUT_S, ClosedLoad, Load, OpenLoad, run_load
from loadtest.sweep import SweepPlan, run_sweep
from loadtest.target import Target, fetch_metadata


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test an Open Inference Protocol (KServe V2) HTTP server.",
    )
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("model", help="model name")
    p.add_argument("--model-version", help="model version (default: the server's choice)")
    g = p.add_argument_group("request bodies")
    g.add_argument("--rows", type=Path, help="Parquet/CSV rows to send (default: random data)")
    g.add_argument("--rows-per-request", type=int, default=1, metavar="N")
    g.add_argument("--binary", action="store_true", help="binary tensor extension, not JSON")
    g.add_argument("--binary-output", action="store_true", help="ask for binary outputs")
    g.add_argument("--pool-size", type=int, default=256, help="distinct pre-encoded bodies")
    g.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2",
        help="dims after the batch dim for inputs with other -1 dims (repeatable)",
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, help="closed loop clients (default 16)")
    g.add_argument("--rate", type=float, help="open loop: offered requests/s")
    g.add_argument("--connections", type=int, default=64, help="open loop connection pool")
    g.add_argument("--arrival", choices=ARRIVALS, default="constant")
    g.add_argument("--warmup", type=float, default=2.0, metavar="S")
    g.add_argument("--duration", type=float, default=10.0, metavar="S")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S")
    g = p.add_argument_group("output check")
    g.add_argument(
        "--check-outputs",
        type=Path,
        metavar="FILE",
        help="expected outputs per row of --rows (JSON, Parquet or CSV)",
    )
    g.add_argument("--rtol", type=float, default=1e-5)
    g.add_argument("--atol", type=float, default=1e-6)
    g = p.add_argument_group("sweep (open loop)")
    g.add_argument("--sweep", action="store_true", help="raise the rate until the SLO breaks")
    g.add_argument("--slo-p99-ms", type=float)
    g.add_argument("--sweep-start", type=float, default=100.0, metavar="RPS")
    g.add_argument("--sweep-factor", type=float, default=1.25)
    g.add_argument("--sweep-step", type=float, metavar="RPS", help="add instead of multiply")
    g.add_argument("--sweep-max", type=float, default=1_000_000.0, metavar="RPS")
    g.add_argument("--step-duration", type=float, default=5.0, metavar="S")
    g.add_argument("--step-warmup", type=float, default=1.0, metavar="S")
    g.add_argument("--min-achieved", type=float, default=0.95)
    g.add_argument("--max-failures", type=int, default=1, help="failed steps in a row to stop")
    g.add_argument("--plot", type=Path, metavar="PNG", help="latency vs throughput plot")
    g = p.add_argument_group("comparison")
    g.add_argument("--compare", metavar="URL2", help="second target, measured alternately")
    g.add_argument("--compare-model", metavar="M2", help="model at URL2 (default: MODEL)")
    g.add_argument("--compare-version")
    g.add_argument("--rounds", type=int, default=3)
    g = p.add_argument_group("misc")
    g.add_argument("--json-out", type=Path, metavar="FILE")
    g.add_argument("--pin-cpu", type=int, metavar="N", help="pin this process to CPU N")
    g.add_argument("--allow-remote", action="store_true", help="allow non-localhost targets")
    g.add_argument("--no-uvloop", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no per-step/per-round progress")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.rate is not None and args.concurrency is not None:
        raise UsageError("--rate (open loop) and --concurrency (closed loop) exclude each other")
    if args.sweep and args.slo_p99_ms is None:
        raise UsageError("--sweep needs --slo-p99-ms")
    if args.sweep and (args.compare or args.rate is not None or args.concurrency is not None):
        raise UsageError("--sweep chooses the rates itself; drop --rate/--concurrency/--compare")
    if args.plot and not args.sweep:
        raise UsageError("--plot draws a sweep: add --sweep")
    if args.check_outputs and not args.rows:
        raise UsageError("--check-outputs compares against rows: add --rows")


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",") if d)
        except ValueError:
            name = ""
        if not sep or not name:
            raise UsageError(f"--shape {spec!r}: expected NAME:D1,D2,...")
    return shapes


def pin_cpu(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu})
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"--pin-cpu {cpu}: {exc}") from exc


async def prepare(
    target: Target, args: argparse.Namespace
) -> tuple[RequestPool, OutputChecker | None]:
    try:
        async with asyncio.timeout(args.timeout):
            meta = await fetch_metadata(target)
    except TimeoutError as exc:
        raise TargetUnreachable(f"{target.label}: no metadata within {args.timeout:g} s") from exc
    spec = BodySpec(
        rows_per_request=args.rows_per_request,
        binary=args.binary,
        binary_output=args.binary_output,
        pool_size=args.pool_size,
        seed=args.seed,
        shapes=parse_shapes(args.shape),
    )
    pool = build_pool(target, meta, spec, args.rows)
    if args.check_outputs is None:
        return pool, None
    expected = load_expected(args.check_outputs, [o.name for o in meta.outputs])
    needed = max(int(ids.max()) for ids in pool.row_ids or ()) + 1
    if expected.rows < needed:
        raise DataError(
            f"{args.check_outputs}: {expected.rows} expected rows, the requests use {needed}"
        )
    return pool, OutputChecker(expected, args.rtol, args.atol)


def load_of(args: argparse.Namespace) -> Load:
    if args.rate is not None:
        return OpenLoad(
            args.rate,
            args.duration,
            args.warmup,
            args.connections,
            args.arrival,
            args.timeout,
            args.seed,
        )
    return ClosedLoad(args.concurrency or 16, args.duration, args.warmup, args.timeout)


async def execute(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Run what the options ask for, print it, and return the JSON document."""
    target = Target.from_url(
        args.url, args.model, args.model_version, allow_remote=args.allow_remote
    )
    other = None
    if args.compare:
        other = Target.from_url(
            args.compare,
            args.compare_model or args.model,
            args.compare_version,
            allow_remote=args.allow_remote,
        )
    pool, checker = await prepare(target, args)
    other_pool, other_checker = await prepare(other, args) if other else (pool, None)
    gc.collect()
    gc.freeze()  # the pool is long-lived: keep it out of every later collection

    def progress(line: str) -> None:
        if not args.quiet:
            console.print(line, soft_wrap=True, highlight=False)

    if args.sweep:
        plan = SweepPlan(
            slo_p99_ms=args.slo_p99_ms,
            start_rps=args.sweep_start,
            factor=args.sweep_factor,
            step_rps=args.sweep_step,
            max_rps=args.sweep_max,
            step_duration=args.step_duration,
            step_warmup=args.step_warmup,
            connections=args.connections,
            arrival=args.arrival,
            request_timeout=args.timeout,
            min_achieved=args.min_achieved,
            max_failures=args.max_failures,
        )
        sweep = await run_sweep(
            target,
            pool,
            plan,
            checker=checker,
            seed=args.seed,
            on_step=lambda s: progress(report.step_line(s)),
        )
        console.print(report.sweep_table(sweep, f"{target.label}: sweep"))
        if args.plot:
            from loadtest.plot import plot_sweep

            plot_sweep(sweep, args.plot, f"{target.label}, p99 SLO {plan.slo_p99_ms:g} ms")
        return {"kind": "sweep", "target": target.label, **sweep.to_dict()}
    load = load_of(args)
    if other is not None:
        comparison = await run_compare(
            Arm(target, pool, checker),
            Arm(other, other_pool, other_checker),
            load,
            args.rounds,
            on_run=lambda side, n, r: progress(
                f"round {n + 1} {side}: {r.ok_rps:,.1f} 2xx/s, p99 {r.latency.p99_ms:.3f} ms"
            ),
        )
        console.print(report.compare_table(comparison))
        return {"kind": "compare", **comparison.to_dict()}
    result = await run_load(target, pool, load, checker)
    console.print(report.run_table(result))
    return {"kind": "run", **result.to_dict()}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        validate(args)
        if args.pin_cpu is not None:
            pin_cpu(args.pin_cpu)
        with asyncio.Runner(loop_factory=_loop_factory(args.no_uvloop)) as runner:
            doc = runner.run(execute(args, console))
        if args.json_out:
            doc["options"] = {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            }
            args.json_out.write_bytes(
                orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
            )
    except LoadTestError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def _loop_factory(disabled: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if disabled:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
