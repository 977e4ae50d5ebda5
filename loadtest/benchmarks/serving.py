"""Serving benchmark: Sluice against a bare-HTTP floor, a hand-written FastAPI app and MLServer.

    python -m loadtest.benchmarks.serving [--runs 3] [--write-readme]   # make bench
    python -m loadtest.benchmarks.serving --quick                       # floor + Sluice, 1 run

Same machine, same model (``fraud`` version 2 from ``models/``), same load:
every server runs pinned to core 1 with ``taskset`` and the load generator (this
process) to core 0. Requests carry real holdout rows (JSON tensors; ``--binary``
for the binary extension, which only the floor and Sluice speak). Workloads:
1-row requests from 1, 16 and 64 closed-loop clients, 16-row requests from 16,
and an open-loop sweep for the highest rate with p99 <= 10 ms. Runs interleave
(for each workload, for each run, every server in turn) so a drift in machine
speed hits all of them; each figure is the median of ``--runs``.

Contenders (``--contenders`` picks some): ``floor`` (Starlette + orjson, fixed
answer, no model), ``fastapi`` (pydantic body, ``inplace_predict`` in the
handler), ``mlserver`` and ``mlserver-batching`` (MLServer's XGBoost runtime,
installed on first use into ``.bench/mlserver-venv``; adaptive batching off and
on), ``sluice-nobatch`` and ``sluice`` (``sluice serve`` with and without
``--no-batching``, telemetry at its defaults; ``--sluice-env K=V`` adds
settings), and ``sluice-cache`` (the result cache warm; only with
``--with-cache``). Every contender but the floor must first answer a few holdout
rows as XGBoost does in process (rtol 1e-5). Any that cannot run is reported as
not available with the reason, and the rest go on.

Also measured in process: XGBoost's ``inplace_predict`` for 1 and 64 rows
(nthread=1, on the server's core), the floors the targets are stated against.
Results go to ``--json-out`` (default ``loadtest/results/serving.json``) with
the sweep plot beside it and server logs in ``serving-logs/``; with
``--write-readme`` the tables replace README.md's ``bench:serving`` section.
The defaults (3 runs, 5 s windows, 2 s sweep steps) take about 13 minutes on
the 2-core development machine, plus about a minute for MLServer's first install.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import orjson

from loadtest.benchmarks import serving_mlserver as mlserver
from loadtest.benchmarks.readme import README, machine, write_section
from loadtest.benchmarks.serving_contenders import (
    CONTENDERS,
    Contender,
    Kind,
    Setup,
    keys_of,
    select,
)
from loadtest.benchmarks.serving_model import ModelData, measure_in_process
from loadtest.benchmarks.serving_report import console, markdown, plot_sweeps
from loadtest.benchmarks.serving_results import (
    SLO_P99_MS,
    WORKLOADS,
    ContenderStatus,
    Suite,
    Workload,
)
from loadtest.benchmarks.serving_run import SWEEP_CONNECTIONS, Plan, run_suite, start_servers
from loadtest.benchmarks.serving_servers import Pinning, Unavailable, pin_self

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "loadtest" / "results"
NORMAL = {"runs": 3, "duration": 5.0, "warmup": 1.0, "step_duration": 2.0, "step_warmup": 0.5}
QUICK = {"runs": 1, "duration": 2.0, "warmup": 0.5, "step_duration": 1.0, "step_warmup": 0.3}


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Durations and counts: given flags, else ``--quick``'s, else the normal ones."""
    defaults = QUICK if args.quick else NORMAL
    given = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    values: dict[str, Any] = {**defaults, **given}
    if values["runs"] < 1:
        raise SystemExit("--runs must be at least 1")
    return Plan(
        settle=args.settle,
        start_fraction=args.sweep_start_fraction,
        factor=args.sweep_factor,
        binary=args.binary,
        **values,
    )


def prepare_mlserver(
    contenders: list[Contender], venv: Path
) -> mlserver.MLServerEnv | Unavailable | None:
    """The MLServer environment when an MLServer contender runs (installing it if needed)."""
    if not any(c.kind == "mlserver" for c in contenders):
        return None
    print(f"MLServer: preparing {venv} ...", flush=True)
    try:
        env = mlserver.ensure_env(venv)
    except Unavailable as exc:
        print(f"MLServer not available: {exc}", file=sys.stderr)
        return exc
    what = "reused" if env.reused else f"installed in {env.install_s:.0f} s"
    print(f"MLServer: {' '.join(env.packages)} {what}", flush=True)
    return env


def versions(env: mlserver.MLServerEnv | Unavailable | None) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("sluice", "xgboost-cpu", "xgboost", "uvicorn", "starlette", "fastapi"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    if isinstance(env, mlserver.MLServerEnv):
        found["mlserver"] = ", ".join(env.packages)
    return found


def describe(
    args: argparse.Namespace,
    argv: list[str],
    plan: Plan,
    pinning: Pinning,
    contenders: list[Contender],
) -> dict[str, Any]:
    """Everything about the run except its figures."""
    return {
        "command": f"python -m loadtest.benchmarks.serving {shlex.join(argv)}".rstrip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "cores": os.cpu_count(),
        "pinning": pinning.note,
        "runs": plan.runs,
        "duration_s": plan.duration,
        "warmup_s": plan.warmup,
        "settle_s": plan.settle,
        "binary": plan.binary,
        "sweep": {
            "slo_p99_ms": SLO_P99_MS,
            "start_fraction": plan.start_fraction,
            "factor": plan.factor,
            "step_duration_s": plan.step_duration,
            "step_warmup_s": plan.step_warmup,
            "connections": SWEEP_CONNECTIONS,
        },
        "notes": config_notes(args, {c.kind for c in contenders}),
    }


def config_notes(args: argparse.Namespace, kinds: set[Kind]) -> list[str]:
    """How each kind of server that ran was configured, in words for the README."""
    config = mlserver_config(args)
    extra = f", plus {' '.join(args.sluice_env)}" if args.sluice_env else ""
    notes: dict[Kind, str] = {
        "floor": "floor: a Starlette app that parses the V2 request with orjson and answers "
        "fixed bytes; it and FastAPI run on uvicorn with uvloop + httptools, 1 worker, "
        "no access log.",
        "fastapi": "FastAPI: a pydantic request model and a plain synchronous handler "
        "calling `inplace_predict` (run in FastAPI's thread pool).",
        "mlserver": f"MLServer: its XGBoost runtime, parallel_workers={config.parallel_workers}, "
        "debug off (no access log), metrics and gzip at their defaults; adaptive batching "
        f"max_batch_size={config.max_batch_size}, "
        f"max_batch_time={config.max_batch_time_s * 1e3:g} ms.",
        "sluice": "Sluice: `sluice serve` at its defaults (telemetry, drift and feedback on; "
        f"dynamic batching on unless marked){extra}.",
    }
    return [text for kind, text in notes.items() if kind in kinds]


def mlserver_config(args: argparse.Namespace) -> mlserver.MLServerConfig:
    return mlserver.MLServerConfig(
        args.mlserver_workers, args.mlserver_batch_size, args.mlserver_batch_time_ms / 1e3
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--model-repository", type=Path, default=ROOT / "models")
    add("--model", default="fraud")
    add("--runs", type=int, help="runs per figure, the median is kept (default 3)")
    add("--duration", type=float, help="measured seconds per closed-loop run (default 5)")
    add("--warmup", type=float, help="unmeasured seconds before each run (default 1)")
    add("--settle", type=float, default=0.5, help="idle seconds between runs")
    add("--sweep-step-duration", dest="step_duration", type=float, help="default 2")
    add("--sweep-step-warmup", dest="step_warmup", type=float, help="default 0.5")
    add("--sweep-start-fraction", type=float, default=0.25, help="of the 64-client rate")
    add("--sweep-factor", type=float, default=1.2)
    add("--quick", action="store_true", help="floor and Sluice only, 1 run, short durations")
    add("--contenders", help=f"comma-separated subset of: {keys_of(CONTENDERS)}")
    add("--workloads", help=f"comma-separated subset of: {', '.join(w.key for w in WORKLOADS)}")
    add("--binary", action="store_true", help="binary tensor extension instead of JSON")
    add("--with-cache", action="store_true", help="also run Sluice with its result cache warm")
    add("--sluice-env", action="append", default=[], metavar="K=V", help="extra Sluice setting")
    add("--mlserver-venv", type=Path, default=mlserver.VENV, help="created on first use")
    add("--mlserver-workers", type=int, default=0, help="MLServer parallel_workers")
    add("--mlserver-batch-size", type=int, default=64, help="adaptive batching max_batch_size")
    add("--mlserver-batch-time-ms", type=float, default=1.0, help="adaptive max_batch_time")
    add("--ready-timeout", type=float, default=180.0, help="seconds a server may take to start")
    add("--no-pin", action="store_true", help="do not pin server and load generator to cores")
    add("--json-out", type=Path, help="default loadtest/results/serving[-quick].json")
    add("--write-readme", action="store_true", help="replace README.md's bench:serving section")
    add("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.sluice_env):
        parser.error("--sluice-env takes K=V")
    return args


def chosen_workloads(spec: str | None) -> tuple[Workload, ...]:
    if not spec:
        return WORKLOADS
    keys = {k.strip() for k in spec.split(",")}
    unknown = keys - {w.key for w in WORKLOADS}
    if unknown:
        raise SystemExit(f"unknown workload(s) {sorted(unknown)}")
    return tuple(w for w in WORKLOADS if w.key in keys)


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = plan_from_args(args)
    # Our own handlers, so that asyncio.run does not turn Ctrl-C into a task cancellation
    # that the harness's drivers absorb: the first signal stops everything.
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    keys = args.contenders.split(",") if args.contenders else None
    contenders, skipped = select(keys, args.quick, args.with_cache, args.binary)
    json_out = args.json_out or RESULTS / ("serving-quick.json" if args.quick else "serving.json")
    data = ModelData.load(args.model_repository, args.model)
    pinning = Pinning.detect(not args.no_pin)
    print(f"{data.name} v{data.version}; {pinning.note}", flush=True)
    env = prepare_mlserver(contenders, args.mlserver_venv)
    suite = Suite(
        describe(args, argv, plan, pinning, contenders) | facts(data, env),
        chosen_workloads(args.workloads),
        initial_statuses(contenders, skipped),
        measure_in_process(data, pinning.server),
    )
    pin_self(pinning.client)
    try:
        measure_all(suite, contenders, data, env, pinning, plan, args, json_out)
    except KeyboardInterrupt:
        print("interrupted: every server was stopped, nothing written", file=sys.stderr)
        return 130
    write_outputs(suite, json_out, args)
    return 0


def initial_statuses(
    contenders: list[Contender], skipped: dict[str, str]
) -> dict[str, ContenderStatus]:
    """Every contender declared for this run, in table order, skipped ones with the reason."""
    return {
        c.key: ContenderStatus(c.label, "skipped", skipped[c.key])
        if c.key in skipped
        else ContenderStatus(c.label)
        for c in CONTENDERS
        if c in contenders or c.key in skipped
    }


def facts(data: ModelData, env: mlserver.MLServerEnv | Unavailable | None) -> dict[str, Any]:
    found: dict[str, Any] = {"model": data.name, "version": data.version, "versions": versions(env)}
    if isinstance(env, mlserver.MLServerEnv):
        found["mlserver_install"] = {"seconds": env.install_s, "reused": env.reused}
    return found


def measure_all(
    suite: Suite,
    contenders: list[Contender],
    data: ModelData,
    env: mlserver.MLServerEnv | Unavailable | None,
    pinning: Pinning,
    plan: Plan,
    args: argparse.Namespace,
    json_out: Path,
) -> None:
    """Start the servers, measure, and stop them whatever happens."""
    sluice_env = dict(item.split("=", 1) for item in args.sluice_env)
    with (
        tempfile.TemporaryDirectory(prefix="sluice-serving-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        setup = Setup(
            data.repository, data.name, data.version, data.artifact, Path(tmp), sluice_env, env,
            mlserver_config(args),
        )  # fmt: skip
        logs = json_out.parent / f"{json_out.stem}-logs"
        statuses = suite.contenders
        servers = start_servers(
            contenders, setup, pinning, logs, statuses, stack, args.ready_timeout
        )
        for key, status in statuses.items():
            if status.state != "measured":
                print(f"{key}: {status.state}: {status.reason}", file=sys.stderr)
        asyncio.run(run_suite(suite, servers, data, plan))


def write_outputs(suite: Suite, json_out: Path, args: argparse.Namespace) -> None:
    json_out.parent.mkdir(parents=True, exist_ok=True)
    plot = json_out.with_name(f"{json_out.stem}-sweep.png")
    drawn = plot_sweeps(suite, plot)
    doc = suite.to_dict()
    json_out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(console(suite))
    print(f"\nresults: {json_out}" + (f", plot: {plot}" if drawn else ""))
    if args.write_readme:
        write_section("serving", markdown(suite, plot if drawn else None, args.readme), args.readme)
        print(f"README section 'serving' written: {args.readme}")


if __name__ == "__main__":
    sys.exit(main())
