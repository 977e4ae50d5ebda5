"""Overload: open loop at twice the measured capacity, and what the server makes of it.

    python -m loadtest.benchmarks.overload_bench [--model-repository models] [--model fraud]
        [--factor 2] [--duration 30] [--connections 512] [--write-readme]

Steps, against one ``sluice serve`` pinned to ``--server-cpu`` (the load
generator on ``--client-cpu``):

1. capacity: a closed loop of ``--concurrency`` clients; its 2xx/s is the
   sustainable rate;
2. unloaded: open loop at ``--unloaded-share`` of capacity, the reference p99;
3. overload: open loop at ``--factor`` x capacity for ``--duration`` s on
   ``--connections`` connections, each request waited for up to
   ``--timeout`` s.

Reported: the shares of 2xx, 503, 504 and other answers and of transport
errors (timeouts among them) in the overload run, the p99 of its 2xx answers
next to the unloaded p99 (both from the intended send time, so a stalled
server shows), and the server's resident memory before and after the
overload run (and its peak). With ``--write-readme`` the table goes into
README.md between the ``bench:overload`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from loadtest import (
    BodySpec,
    ClosedLoad,
    OpenLoad,
    RunResult,
    Target,
    fetch_metadata,
    random_pool,
    run_load,
)
from loadtest.benchmarks.readme import provenance, write_section

SERVE = (sys.executable, "-m", "server", "serve")


@dataclass(frozen=True, slots=True)
class Memory:
    rss_mib: float
    peak_mib: float


@dataclass(frozen=True, slots=True)
class Report:
    model: str
    rows_per_request: int
    capacity_rps: float
    offered_rps: float
    duration_s: float
    connections: int
    unloaded_rps: float
    unloaded_p99_ms: float
    unloaded_p50_ms: float
    sent: int
    shares: dict[str, float]
    timeouts: int
    accepted_rps: float
    accepted_p50_ms: float
    accepted_p99_ms: float
    memory_before: Memory
    memory_after: Memory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def memory(pid: int) -> Memory:
    """Resident and peak resident memory of ``pid`` (``/proc/<pid>/status``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return Memory(
        rss_mib=int(fields["VmRSS"].split()[0]) / 1024,
        peak_mib=int(fields["VmHWM"].split()[0]) / 1024,
    )


def serve(repo: Path, log: Path, cpu: int | None, env: dict[str, str]) -> tuple[Any, str]:
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--model-repository", str(repo), "--port", str(port), "--log-level", "error"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        preexec_fn=(lambda: pin(cpu)) if cpu is not None else None,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling readiness, bounded by the deadline
    process.kill()
    raise SystemExit(f"server not ready in 120 s:\n{log.read_text()}")


def shares(run: RunResult) -> dict[str, float]:
    sent = sum(run.statuses.values()) + sum(run.errors.values())
    if not sent:
        return {}
    out = {"2xx": sum(n for s, n in run.statuses.items() if 200 <= s < 300) / sent}
    for status in (429, 503, 504):
        out[str(status)] = run.statuses.get(status, 0) / sent
    out["other status"] = 1.0 - sum(out.values()) - sum(run.errors.values()) / sent
    out["transport errors"] = sum(run.errors.values()) / sent
    return out


async def measure(url: str, pid: int, args: argparse.Namespace) -> Report:
    target = Target.from_url(url, args.model)
    async with asyncio.timeout(30):
        meta = await fetch_metadata(target)
    pool = random_pool(target, meta, BodySpec(rows_per_request=args.rows_per_request))
    closed = ClosedLoad(concurrency=args.concurrency, duration=args.capacity_s, warmup=2.0)
    capacity = (await run_load(target, pool, closed)).ok_rps
    print(f"capacity: {capacity:,.0f} req/s", file=sys.stderr)
    unloaded = await run_load(
        target,
        pool,
        OpenLoad(rate=capacity * args.unloaded_share, duration=args.unloaded_s, warmup=1.0),
    )
    print(f"unloaded: p99 {unloaded.latency.p99_ms:.2f} ms", file=sys.stderr)
    before = memory(pid)
    offered = capacity * args.factor
    overload = await run_load(
        target,
        pool,
        OpenLoad(
            rate=offered,
            duration=args.duration,
            warmup=0.0,
            connections=args.connections,
            arrival="poisson",
            request_timeout=args.timeout,
        ),
    )
    after = memory(pid)
    return Report(
        model=args.model,
        rows_per_request=args.rows_per_request,
        capacity_rps=capacity,
        offered_rps=offered,
        duration_s=args.duration,
        connections=args.connections,
        unloaded_rps=capacity * args.unloaded_share,
        unloaded_p99_ms=unloaded.latency.p99_ms,
        unloaded_p50_ms=unloaded.latency.p50_ms,
        sent=sum(overload.statuses.values()) + sum(overload.errors.values()),
        shares=shares(overload),
        timeouts=overload.errors.get("timeout", 0),
        accepted_rps=overload.ok_rps,
        accepted_p50_ms=overload.latency.p50_ms,
        accepted_p99_ms=overload.latency.p99_ms,
        memory_before=before,
        memory_after=after,
    )


def readme_table(report: Report, argv: list[str] | None) -> str:
    s = report.shares
    lines = [
        "| offered | 2xx | 503 | 504 | other | transport errors (timeouts) | accepted p99 "
        "| unloaded p99 | RSS before → after (peak) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {report.offered_rps:,.0f} req/s | {s.get('2xx', 0):.1%} | {s.get('503', 0):.1%} "
        f"| {s.get('504', 0):.1%} | {s.get('other status', 0):.1%} "
        f"| {s.get('transport errors', 0):.1%} ({report.timeouts}) "
        f"| {report.accepted_p99_ms:.2f} ms | {report.unloaded_p99_ms:.2f} ms "
        f"| {report.memory_before.rss_mib:.0f} → {report.memory_after.rss_mib:.0f} MiB "
        f"({report.memory_after.peak_mib:.0f}) |",
    ]
    prose = (
        f"`{report.model}`, {report.rows_per_request}-row JSON requests. Capacity (closed loop) "
        f"{report.capacity_rps:,.0f} req/s; offered twice that in open loop (Poisson) for "
        f"{report.duration_s:g} s over {report.connections} connections, {report.sent:,} "
        f"requests; {report.accepted_rps:,.0f} 2xx/s were answered meanwhile. Unloaded: "
        f"open loop at {report.unloaded_rps:,.0f} req/s. Latencies from the intended send "
        "time, 2xx only. Server and load generator pinned to different cores."
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
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop for capacity")
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--unloaded-share", type=float, default=0.25)
    parser.add_argument("--unloaded-s", type=float, default=10.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="VAR=VALUE", help="for the server"
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    pin(None if args.no_pin else args.client_cpu)
    env = dict(item.split("=", 1) for item in args.server_env)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = serve(
            args.model_repository,
            Path(tmp) / "server.log",
            None if args.no_pin else args.server_cpu,
            env,
        )
        try:
            report = asyncio.run(measure(url, process.pid, args))
        finally:
            process.terminate()
            process.wait(60)
    text = readme_table(report, argv)
    print(text)
    if args.json_out is not None:
        args.json_out.write_bytes(orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2))
    if args.write_readme:
        write_section("overload", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
