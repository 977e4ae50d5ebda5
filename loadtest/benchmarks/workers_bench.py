"""Workers: one ``sluice serve`` process against ``--workers 2``, throughput and CPU per request.

    python -m loadtest.benchmarks.workers_bench [--model-repository models] [--model fraud]
        [--rounds 5] [--duration 10] [--write-readme]

Two server shapes, both on the same repository: ``--workers 1`` (one process)
and ``--workers 2`` (a supervisor and two workers on one port, SO_REUSEPORT).
The load tester's closed loop (``--concurrency`` clients, 1-row JSON requests)
alternates between them for ``--rounds`` rounds, in two CPU layouts:

- ``pinned``: every server process on ``--server-cpu`` (``taskset``), the load
  generator on ``--client-cpu``. One core of server either way, so this shows
  what a second process costs; two workers also run at twice the clients,
  where each worker's micro-batches are as large as the single process's;
- ``shared``: nothing pinned, server and load generator on the same cores
  (all of this machine's). The throughput of two workers against one here is
  what a second core buys, less what the load generator takes of it.

Server CPU per request: user + system time of the supervisor and every worker
(``/proc/<pid>/stat``, all threads) over a run, divided by the responses the
run received; rows per batch from the servers' ``ml_inference_batch_size``
histogram over the run. Resident memory of each worker (``VmRSS``) is taken
after the last round. With ``--write-readme`` the table goes into README.md between the
``bench:workers`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from loadtest import BodySpec, ClosedLoad, Target, fetch_metadata, random_pool, run_load
from loadtest.benchmarks.overload_bench import memory
from loadtest.benchmarks.readme import with_notes, write_section
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
READY_S = 120.0


@dataclass(frozen=True, slots=True)
class ArmSpec:
    """A load on a server shape: worker processes, and clients as a multiple of --concurrency."""

    workers: int
    clients_factor: int = 1


# Pinned, every server on one core: two workers at the same clients each get half the
# traffic, so their micro-batches are half as large; at twice the clients each worker
# sees what the single process sees, which is what a host with N workers and N times
# the traffic has.
ARMS: dict[Layout, tuple[ArmSpec, ...]] = {
    "pinned": (ArmSpec(1), ArmSpec(2), ArmSpec(2, 2)),
    "shared": (ArmSpec(1), ArmSpec(2)),
}


@dataclass(slots=True)
class Shape:
    """One running server: ``workers`` processes on one port."""

    workers: int
    server: Server

    def pids(self) -> list[int]:
        """The server process and its children (the workers, under a supervisor)."""
        root = self.server.process.pid
        return [root, *children(root)]

    def worker_pids(self) -> list[int]:
        return self.pids()[1:] if self.workers > 1 else self.pids()

    def cpu_s(self) -> float:
        return sum(cpu_s(pid) for pid in self.pids())


@dataclass(slots=True)
class Arm:
    """One load on one shape, and what each round measured."""

    shape: Shape
    clients: int
    ok_rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    batch_rows: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.shape.workers} worker(s), {self.clients} clients"


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


def batch_rows(url: str) -> tuple[float, float]:
    """Rows executed and model executions so far, every worker (``/metrics``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    rows = executions = 0.0
    for line in text.splitlines():
        if line.startswith("ml_inference_batch_size_sum"):
            rows += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ml_inference_batch_size_count"):
            executions += float(line.rsplit(" ", 1)[1])
    return rows, executions


async def measure(arms: list[Arm], args: argparse.Namespace, layout: Layout) -> None:
    """``args.rounds`` rounds, each running every arm in turn (the order alternates)."""
    pools = {}
    for arm in arms:
        url = arm.shape.server.url
        if url not in pools:
            target = Target.from_url(url, args.model)
            async with asyncio.timeout(30):
                meta = await fetch_metadata(target)
            pools[url] = (target, random_pool(target, meta, BodySpec(rows_per_request=1)))
        target, pool = pools[url]
        await run_load(target, pool, ClosedLoad(concurrency=arm.clients, duration=args.warmup))
    for round_no in range(args.rounds):
        for arm in arms if round_no % 2 == 0 else arms[::-1]:
            shape = arm.shape
            target, pool = pools[shape.server.url]
            load = ClosedLoad(concurrency=arm.clients, duration=args.duration)
            rows, executions = batch_rows(shape.server.url)
            cpu, busy, own = shape.cpu_s(), machine_busy_s(), own_cpu_s()
            started = time.monotonic()
            run = await run_load(target, pool, load)
            cpu = shape.cpu_s() - cpu
            wall = time.monotonic() - started
            foreign = machine_busy_s() - busy - cpu - (own_cpu_s() - own)
            rows_after, executions_after = batch_rows(shape.server.url)
            arm.ok_rps.append(run.ok_rps)
            arm.cpu_us.append(cpu / run.completed * 1e6 if run.completed else float("nan"))
            arm.p99_ms.append(run.latency.p99_ms)
            arm.batch_rows.append((rows_after - rows) / max(executions_after - executions, 1))
            arm.other_cores.append(max(foreign, 0.0) / wall)
            print(
                f"{layout} round {round_no + 1} {arm.label}: {run.ok_rps:8.0f} req/s, "
                f"{arm.cpu_us[-1]:6.1f} us CPU/request, batches of {arm.batch_rows[-1]:.1f} "
                f"rows, p99 {run.latency.p99_ms:.2f} ms, server {cpu / wall:.2f} cores, load "
                f"generator {run.client_cpu_util:.0%}, other load {arm.other_cores[-1]:.2f} "
                f"cores, errors {dict(run.errors) or 'none'}",
                file=sys.stderr,
            )


def summary(arm: Arm, rss_mib: list[float]) -> dict[str, Any]:
    return {
        "workers": arm.shape.workers,
        "clients": arm.clients,
        "ok_rps": statistics.median(arm.ok_rps),
        "cpu_us_per_request": statistics.median(arm.cpu_us),
        "p99_ms": statistics.median(arm.p99_ms),
        "batch_rows": statistics.median(arm.batch_rows),
        "worker_rss_mib": rss_mib,
        "ok_rps_each": arm.ok_rps,
        "cpu_us_each": arm.cpu_us,
        "other_load_cores_each": arm.other_cores,
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
    specs = ARMS[layout]
    with contextlib.ExitStack() as stack:
        shapes: dict[int, Shape] = {}
        for workers in sorted({spec.workers for spec in specs}):
            shape = start(workers, args.model_repository, logs / layout, pinning, args.serve_arg)
            stack.enter_context(shape.server)
            shapes[workers] = shape
        for shape in shapes.values():
            wait_ready(shape)
        arms = [Arm(shapes[spec.workers], args.concurrency * spec.clients_factor) for spec in specs]
        asyncio.run(measure(arms, args, layout))
        rss = {w: [memory(pid).rss_mib for pid in s.worker_pids()] for w, s in shapes.items()}
    figures = [summary(arm, rss[arm.shape.workers]) for arm in arms]
    base = figures[0]
    return {
        "arms": figures,
        # Each against the single process, round by round.
        "rps_ratio": [paired(f["ok_rps_each"], base["ok_rps_each"]) for f in figures],
        "cpu_ratio": [paired(f["cpu_us_each"], base["cpu_us_each"]) for f in figures],
        "other_load_cores": statistics.median(
            [core for f in figures for core in f["other_load_cores_each"]]
        ),
    }


def readme_table(report: dict[str, Any], argv: list[str] | None) -> str:
    lines = [
        "| layout | workers | clients | req/s | server CPU per request | rows per batch "
        "| p99 | RSS per worker | vs 1 worker: req/s, CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for layout in LAYOUTS:
        figures = report["layouts"].get(layout)
        if figures is None:
            continue
        for arm, rps, cpu in zip(
            figures["arms"], figures["rps_ratio"], figures["cpu_ratio"], strict=True
        ):
            rss = statistics.median(arm["worker_rss_mib"])
            versus = "" if arm["workers"] == 1 else f"**{rps:.2f}**, **{cpu:.2f}**"
            lines.append(
                f"| {layout} | {arm['workers']} | {arm['clients']} | {arm['ok_rps']:,.0f} "
                f"| {arm['cpu_us_per_request']:.0f} µs | {arm['batch_rows']:.1f} "
                f"| {arm['p99_ms']:.2f} ms | {rss:.0f} MiB | {versus} |"
            )
    pinned = report["pinned_note"]
    prose = (
        f"Medians of {report['rounds']} alternating rounds of {report['duration_s']:g} s "
        f"of closed-loop 1-row JSON requests to `{report['model']}`; ratios are medians of "
        "the per-round ratios against the single process (each pair back to back). Pinned: "
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
    return with_notes(lines, prose, argv)


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
