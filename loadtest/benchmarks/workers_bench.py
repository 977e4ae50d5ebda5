"""Workers: one ``sluice serve`` process against ``--workers 2``, throughput and CPU per request.

    python -m loadtest.benchmarks.workers_bench [--model-repository models] [--model fraud]
        [--rounds 5] [--duration 10] [--write-readme]

Two server shapes, both on the same repository: ``--workers 1`` (one process)
and ``--workers 2`` (a supervisor and two workers on one port, SO_REUSEPORT).
The load tester's closed loop (``--concurrency`` clients, 1-row JSON requests)
alternates between them for ``--rounds`` rounds, in two CPU layouts:

- ``pinned``: every server process on ``--server-cpu`` (``taskset``), the load
  generator on ``--client-cpu``. One core of server either way, so this shows
  what a second process costs: server CPU per request should stay flat;
- ``shared``: nothing pinned, server and load generator on the same cores
  (all of this machine's). The throughput of two workers against one here is
  what a second core buys, less what the load generator takes of it.

Server CPU per request: user + system time of the supervisor and every worker
(``/proc/<pid>/stat``, all threads) over a run, divided by the responses the
run received. Resident memory of each worker (``VmRSS``) is taken after the
last round. With ``--write-readme`` the table goes into README.md between the
``bench:workers`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from loadtest import BodySpec, ClosedLoad, Target, fetch_metadata, random_pool, run_load
from loadtest.benchmarks.overload_bench import memory
from loadtest.benchmarks.readme import provenance, write_section
from loadtest.benchmarks.serving_servers import (
    Pinning,
    Server,
    ServerCommand,
    ServerFailed,
    free_port,
    pin_self,
)
from loadtest.benchmarks.telemetry_bench import TICKS, machine_busy_s, own_cpu_s, paired

Layout = Literal["pinned", "shared"]
LAYOUTS: tuple[Layout, ...] = ("pinned", "shared")
SHAPES = (1, 2)  # worker processes
READY_S = 120.0


@dataclass(slots=True)
class Shape:
    """One server shape in one layout, and what each round measured."""

    workers: int
    server: Server
    ok_rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)
    worker_rss_mib: list[float] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The server process and its children (the workers, under a supervisor)."""
        root = self.server.process.pid
        return [root, *children(root)]

    def cpu_s(self) -> float:
        return sum(cpu_s(pid) for pid in self.pids())


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int(stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: state, ppid, ... (man 5 proc, from 3)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, every thread; 0 once it is gone."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def start(workers: int, repo: Path, logs: Path, pinning: Pinning, extra: list[str]) -> Shape:
    port = free_port()
    argv = [sys.executable, "-m", "server", "serve", "--model-repository", str(repo)]
    argv += ["--port", str(port), "--log-level", "warning", "--workers", str(workers), *extra]
    name = f"{workers}-worker"
    return Shape(workers, Server(name, ServerCommand(argv, port), logs / f"{name}.log", pinning))


def wait_ready(shape: Shape) -> None:
    """Ready once health answers and, with workers, a scrape sees every one of them."""
    server = shape.server
    server.wait_ready("/v2/health/ready", READY_S)
    deadline = time.monotonic() + READY_S
    while shape.workers > 1 and time.monotonic() < deadline:
        if not server.alive:
            raise ServerFailed(f"{server.name} exited; log: {server.log}")
        if scraped_workers(server.url) == shape.workers:
            return
        time.sleep(0.1)  # polling readiness, bounded by the deadline
    if shape.workers > 1:
        raise ServerFailed(f"{server.name}: not every worker ready; log: {server.log}")


def scraped_workers(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return 0
    for line in text.splitlines():
        if line.startswith("sluice_fleet_workers_scraped "):
            return int(float(line.split()[1]))
    return 0


async def measure(shapes: list[Shape], args: argparse.Namespace, layout: Layout) -> None:
    """``args.rounds`` rounds, each running every shape in turn (the order alternates)."""
    pools = {}
    for shape in shapes:
        target = Target.from_url(shape.server.url, args.model)
        async with asyncio.timeout(30):
            meta = await fetch_metadata(target)
        pool = random_pool(target, meta, BodySpec(rows_per_request=1))
        pools[shape.workers] = (target, pool)
        warm = ClosedLoad(concurrency=args.concurrency, duration=args.warmup)
        await run_load(target, pool, warm)
    load = ClosedLoad(concurrency=args.concurrency, duration=args.duration)
    for round_no in range(args.rounds):
        order = shapes if round_no % 2 == 0 else shapes[::-1]
        for shape in order:
            target, pool = pools[shape.workers]
            cpu, busy, own = shape.cpu_s(), machine_busy_s(), own_cpu_s()
            started = time.monotonic()
            run = await run_load(target, pool, load)
            cpu = shape.cpu_s() - cpu
            wall = time.monotonic() - started
            foreign = machine_busy_s() - busy - cpu - (own_cpu_s() - own)
            shape.ok_rps.append(run.ok_rps)
            shape.cpu_us.append(cpu / run.completed * 1e6 if run.completed else float("nan"))
            shape.p99_ms.append(run.latency.p99_ms)
            shape.other_cores.append(max(foreign, 0.0) / wall)
            print(
                f"{layout} round {round_no + 1} {shape.workers} worker(s): "
                f"{run.ok_rps:8.0f} req/s, {shape.cpu_us[-1]:6.1f} us CPU/request, "
                f"p99 {run.latency.p99_ms:.2f} ms, server {cpu / wall:.2f} cores, load "
                f"generator {run.client_cpu_util:.0%}, other load {shape.other_cores[-1]:.2f} "
                f"cores, errors {dict(run.errors) or 'none'}",
                file=sys.stderr,
            )
    for shape in shapes:
        worker_pids = shape.pids()[1:] if shape.workers > 1 else shape.pids()
        shape.worker_rss_mib = [memory(pid).rss_mib for pid in worker_pids]


def summary(shape: Shape) -> dict[str, Any]:
    return {
        "workers": shape.workers,
        "ok_rps": statistics.median(shape.ok_rps),
        "cpu_us_per_request": statistics.median(shape.cpu_us),
        "p99_ms": statistics.median(shape.p99_ms),
        "worker_rss_mib": shape.worker_rss_mib,
        "ok_rps_each": shape.ok_rps,
        "cpu_us_each": shape.cpu_us,
        "other_load_cores_each": shape.other_cores,
    }


def run_layout(
    layout: Layout, args: argparse.Namespace, cpus: set[int], logs: Path
) -> dict[str, Any]:
    if layout == "pinned" and not args.no_pin:
        pinning = Pinning(args.server_cpu, args.client_cpu, "")
        pin_self(args.client_cpu)
    else:
        pinning = Pinning(None, None, "")
        os.sched_setaffinity(0, cpus)
    with contextlib.ExitStack() as stack:
        shapes = []
        for workers in SHAPES:
            shape = start(workers, args.model_repository, logs / layout, pinning, args.serve_arg)
            stack.enter_context(shape.server)
            shapes.append(shape)
        for shape in shapes:
            wait_ready(shape)
        asyncio.run(measure(shapes, args, layout))
    one, two = (summary(shape) for shape in shapes)
    return {
        "one": one,
        "two": two,
        "rps_ratio": paired(two["ok_rps_each"], one["ok_rps_each"]),
        "cpu_ratio": paired(two["cpu_us_each"], one["cpu_us_each"]),
        "other_load_cores": statistics.median(
            one["other_load_cores_each"] + two["other_load_cores_each"]
        ),
    }


def readme_table(report: dict[str, Any], argv: list[str] | None) -> str:
    lines = [
        "| layout | workers | req/s | server CPU per request | p99 | RSS per worker |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for layout in LAYOUTS:
        figures = report["layouts"].get(layout)
        if figures is None:
            continue
        for key in ("one", "two"):
            shape = figures[key]
            rss = statistics.median(shape["worker_rss_mib"])
            lines.append(
                f"| {layout} | {shape['workers']} | {shape['ok_rps']:,.0f} "
                f"| {shape['cpu_us_per_request']:.0f} µs | {shape['p99_ms']:.2f} ms "
                f"| {rss:.0f} MiB |"
            )
        lines.append(
            f"| **{layout}: 2 / 1** | | **{figures['rps_ratio']:.2f}** "
            f"| **{figures['cpu_ratio']:.2f}** | | |"
        )
    pinned = report["pinned_note"]
    prose = (
        f"Medians of {report['rounds']} alternating rounds of {report['duration_s']:g} s, "
        f"{report['concurrency']} clients, 1-row JSON requests to `{report['model']}`; ratios "
        "are medians of the per-round ratios (each pair back to back). Pinned: "
        f"{pinned}. Shared: nothing pinned, the server and the load generator on the "
        f"{len(report['cpus'])} CPUs this benchmark may use. Server CPU per request: "
        "user + system time of every server process over the responses received. Other "
        "load on the machine meanwhile (median): "
        + ", ".join(
            f"{layout} {report['layouts'][layout]['other_load_cores']:.2f} cores"
            for layout in LAYOUTS
            if layout in report["layouts"]
        )
        + "."
    )
    return "\n".join(
        [
            *lines,
            "",
            textwrap.fill(prose, width=80),
            "",
            textwrap.fill(provenance(argv), width=80, break_long_words=False),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="per shape, before round 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--layout", choices=[*LAYOUTS, "both"], default="both", help="CPU layouts to run"
    )
    parser.add_argument("--server-cpu", type=int, default=1, help="pinned: every server here")
    parser.add_argument("--client-cpu", type=int, default=0, help="pinned: the load generator")
    parser.add_argument("--no-pin", action="store_true", help="'pinned' runs unpinned too")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to both servers' sluice serve, e.g. --serve-arg=--no-batching",
    )
    parser.add_argument("--logs", type=Path, default=Path(".bench/workers"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    cpus = os.sched_getaffinity(0)
    report: dict[str, Any] = {
        "cpus": sorted(cpus),
        "model": args.model,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "pinned_note": (
            "not pinned (--no-pin)"
            if args.no_pin
            else f"every server process on CPU {args.server_cpu}, the load generator on "
            f"CPU {args.client_cpu}"
        ),
        "layouts": {},
    }
    for layout in layouts:
        report["layouts"][layout] = run_layout(layout, args, cpus, args.logs)
    text = readme_table(report, argv)
    print(text)
    if args.json_out is not None:
        args.json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if args.write_readme:
        write_section("workers", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
