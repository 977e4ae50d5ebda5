"""Overload: open loop at twice the measured capacity, and what the server makes of it.

    python -m loadtest.benchmarks.overload_bench [--model-repository models] [--model fraud]
        [--factor 2] [--duration 30] [--connections 512] [--write-readme]
        [--contender NAME=VAR=VALUE,VAR=VALUE ...] [--rounds N]

Steps, against ``sluice serve`` pinned to ``--server-cpu`` (the load
generator on ``--client-cpu``), for each contender in each round:

1. full load: a closed loop of ``--concurrency`` clients; the first
   contender's first 2xx/s is the sustainable rate (``--capacity-rps`` to
   give it instead), and every contender's share of 503 here says whether it
   sheds at full load, which it must not;
2. unloaded: open loop at ``--unloaded-share`` of capacity, the reference p99;
3. overload: open loop at ``--factor`` x capacity for ``--duration`` s on
   ``--connections`` connections, each request waited for up to
   ``--timeout`` s.

Contenders are servers started with different ``SLUICE_*`` variables, all
running at once on the same core and measured in turn (A, B, A, B...), so
that a busy moment on the shared machine falls on both; the figures are each
contender's medians over the rounds. Reported: the shares of 2xx, 503, 504
and other answers and of transport errors (timeouts among them) in the
overload run, the p99 of its 2xx answers next to the unloaded p99 (both from
the intended send time, so a stalled server shows), their ratio, the 503
share at full load, and the server's resident memory before and after the
overload runs. With ``--write-readme`` the table goes into README.md between
the ``bench:overload`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
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
    RequestPool,
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
class Contender:
    name: str
    env: dict[str, str]
    checkout: Path | None = None  # another source tree of Sluice (a git worktree), or this one


@dataclass(frozen=True, slots=True)
class Round:
    """One contender's figures in one round."""

    full_load_rps: float
    full_load_503: float
    unloaded_p99_ms: float
    unloaded_p50_ms: float
    sent: int
    shares: dict[str, float]
    timeouts: int
    accepted_rps: float
    accepted_p50_ms: float
    accepted_p99_ms: float


@dataclass(frozen=True, slots=True)
class Report:
    """One contender over every round: medians, and the rounds themselves."""

    contender: str
    env: dict[str, str]
    model: str
    rows_per_request: int
    capacity_rps: float
    offered_rps: float
    duration_s: float
    connections: int
    unloaded_rps: float
    full_load_rps: float
    full_load_503: float
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
    rounds: list[Round]

    @property
    def p99_ratio(self) -> float:
        return self.accepted_p99_ms / self.unloaded_p99_ms if self.unloaded_p99_ms else 0.0


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


def serve(
    repo: Path, log: Path, cpu: int | None, env: dict[str, str], checkout: Path | None = None
) -> tuple[Any, str]:
    port = free_port()
    flags = ["--model-repository", str(repo.resolve()), "--port", str(port), "--log-level"]
    process = subprocess.Popen(
        [*SERVE, *flags, "error"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        # ``python -m server`` imports the package from the working directory first.
        cwd=checkout,
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


@dataclass(slots=True)
class Server:
    contender: Contender
    target: Target
    pid: int
    pool: RequestPool | None = None
    before: Memory | None = None
    after: Memory | None = None

    @property
    def requests(self) -> RequestPool:
        assert self.pool is not None, "measure() builds the pool first"
        return self.pool


async def full_load(server: Server, args: argparse.Namespace) -> RunResult:
    closed = ClosedLoad(concurrency=args.concurrency, duration=args.capacity_s, warmup=2.0)
    return await run_load(server.target, server.requests, closed)


async def one_round(server: Server, capacity: float, args: argparse.Namespace) -> Round:
    name = server.contender.name
    full = await full_load(server, args)
    unloaded = await run_load(
        server.target,
        server.requests,
        OpenLoad(rate=capacity * args.unloaded_share, duration=args.unloaded_s, warmup=1.0),
    )
    if server.before is None:
        server.before = memory(server.pid)
    overload = await run_load(
        server.target,
        server.requests,
        OpenLoad(
            rate=capacity * args.factor,
            duration=args.duration,
            warmup=args.overload_warmup,
            connections=args.connections,
            arrival="poisson",
            request_timeout=args.timeout,
        ),
    )
    server.after = memory(server.pid)
    split = shares(overload)
    print(
        f"{name}: full load {full.ok_rps:,.0f} 2xx/s, {shares(full).get('503', 0):.1%} 503; "
        f"unloaded p99 {unloaded.latency.p99_ms:.2f} ms; overload {split.get('2xx', 0):.1%} "
        f"2xx, p99 {overload.latency.p99_ms:.2f} ms, {overload.errors.get('timeout', 0)} "
        "timeouts",
        file=sys.stderr,
    )
    return Round(
        full_load_rps=full.ok_rps,
        full_load_503=shares(full).get("503", 0.0),
        unloaded_p99_ms=unloaded.latency.p99_ms,
        unloaded_p50_ms=unloaded.latency.p50_ms,
        sent=sum(overload.statuses.values()) + sum(overload.errors.values()),
        shares=split,
        timeouts=overload.errors.get("timeout", 0),
        accepted_rps=overload.ok_rps,
        accepted_p50_ms=overload.latency.p50_ms,
        accepted_p99_ms=overload.latency.p99_ms,
    )


async def measure(servers: list[Server], args: argparse.Namespace) -> list[Report]:
    for server in servers:
        async with asyncio.timeout(30):
            meta = await fetch_metadata(server.target)
        server.pool = random_pool(
            server.target, meta, BodySpec(rows_per_request=args.rows_per_request)
        )
        # A fresh server is still warming up (allocator, caches, executors built at load).
        warm = ClosedLoad(concurrency=args.concurrency, duration=args.warmup_s, warmup=0.0)
        await run_load(server.target, server.requests, warm)
    capacity = args.capacity_rps
    if capacity is None:
        capacity = (await full_load(servers[0], args)).ok_rps
    print(f"capacity: {capacity:,.0f} req/s", file=sys.stderr)
    rounds: dict[str, list[Round]] = {s.contender.name: [] for s in servers}
    for _ in range(args.rounds):
        for server in servers:
            rounds[server.contender.name].append(await one_round(server, capacity, args))
    return [report(server, rounds[server.contender.name], capacity, args) for server in servers]


def report(
    server: Server, rounds: list[Round], capacity: float, args: argparse.Namespace
) -> Report:
    def median(field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in rounds))

    keys = rounds[0].shares.keys()
    assert server.before is not None
    assert server.after is not None
    return Report(
        contender=server.contender.name,
        env=server.contender.env,
        model=args.model,
        rows_per_request=args.rows_per_request,
        capacity_rps=capacity,
        offered_rps=capacity * args.factor,
        duration_s=args.duration,
        connections=args.connections,
        unloaded_rps=capacity * args.unloaded_share,
        full_load_rps=median("full_load_rps"),
        full_load_503=median("full_load_503"),
        unloaded_p99_ms=median("unloaded_p99_ms"),
        unloaded_p50_ms=median("unloaded_p50_ms"),
        sent=int(median("sent")),
        shares={k: statistics.median(r.shares.get(k, 0.0) for r in rounds) for k in keys},
        timeouts=int(median("timeouts")),
        accepted_rps=median("accepted_rps"),
        accepted_p50_ms=median("accepted_p50_ms"),
        accepted_p99_ms=median("accepted_p99_ms"),
        memory_before=server.before,
        memory_after=server.after,
        rounds=rounds,
    )


def readme_table(reports: list[Report], args: argparse.Namespace, argv: list[str] | None) -> str:
    several = len(reports) > 1
    lines = [
        ("| contender " if several else "")
        + "| 2xx | 503 | 504 | other | transport errors (timeouts) | accepted p99 "
        "| unloaded p99 | accepted / unloaded p99 | 503 at full load "
        "| RSS before → after (peak) |",
        ("| --- " if several else "") + "| ---: " * 10 + "|",
    ]
    for r in reports:
        s = r.shares
        lines.append(
            (f"| {r.contender} " if several else "")
            + f"| {s.get('2xx', 0):.1%} | {s.get('503', 0):.1%} "
            f"| {s.get('504', 0):.1%} | {s.get('other status', 0):.1%} "
            f"| {s.get('transport errors', 0):.1%} ({r.timeouts}) "
            f"| {r.accepted_p99_ms:.2f} ms | {r.unloaded_p99_ms:.2f} ms | {r.p99_ratio:.1f}x "
            f"| {r.full_load_503:.2%} "
            f"| {r.memory_before.rss_mib:.0f} → {r.memory_after.rss_mib:.0f} MiB "
            f"({r.memory_after.peak_mib:.0f}) |"
        )
    first = reports[0]
    prose = (
        f"`{first.model}`, {first.rows_per_request}-row JSON requests. Capacity (closed loop of "
        f"{args.concurrency} clients) {first.capacity_rps:,.0f} req/s; offered "
        f"{args.factor:g} x that, {first.offered_rps:,.0f} req/s, in open loop (Poisson) for "
        f"{first.duration_s:g} s over {first.connections} connections, about {first.sent:,} "
        f"requests; "
        + "; ".join(f"{r.contender}: {r.accepted_rps:,.0f} 2xx/s" for r in reports)
        + f" answered meanwhile. Unloaded: open loop at {first.unloaded_rps:,.0f} req/s. "
        f"503 at full load: the share refused in the {args.concurrency}-client closed loop. "
        "Latencies from the intended send time, 2xx only. Server and load generator pinned "
        "to different cores."
    )
    if args.overload_warmup:
        prose += (
            f" The overload's first {args.overload_warmup:g} s (its onset) are sent but not "
            "measured."
        )
    if several:
        prose += (
            f" Medians of {args.rounds} rounds, contenders alternated; "
            + "; ".join(
                f"{r.contender}: {' '.join(f'{k}={v}' for k, v in r.env.items()) or 'defaults'}"
                for r in reports
            )
            + "."
        )
    return "\n".join(
        [
            *lines,
            "",
            textwrap.fill(prose, width=80, break_long_words=False),
            "",
            textwrap.fill(provenance(argv), width=80, break_long_words=False),
        ]
    )


def contender(text: str) -> Contender:
    """``NAME[@CHECKOUT]=VAR=VALUE,VAR=VALUE`` (or just ``NAME``: the defaults here)."""
    head, _, rest = text.partition("=")
    name, _, checkout = head.partition("@")
    env = dict(item.split("=", 1) for item in rest.split(",") if item)
    return Contender(name, env, Path(checkout) if checkout else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop for capacity")
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--capacity-rps", type=float, help="instead of measuring it")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="full load, not measured")
    parser.add_argument("--unloaded-share", type=float, default=0.25)
    parser.add_argument("--unloaded-s", type=float, default=10.0)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=512)
    parser.add_argument(
        "--overload-warmup",
        type=float,
        default=0.0,
        metavar="S",
        help="overload sent this long before the measured window (0: the onset counts)",
    )
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="VAR=VALUE", help="for every server"
    )
    parser.add_argument(
        "--contender",
        action="append",
        type=contender,
        default=[],
        metavar="NAME[@CHECKOUT]=VAR=VALUE,...",
        help="a server with these variables, from this source tree (a git worktree; default "
        "this one); repeat for more (default: one, 'sluice')",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    pin(None if args.no_pin else args.client_cpu)
    common = dict(item.split("=", 1) for item in args.server_env)
    contenders = args.contender or [Contender("sluice", {})]
    with tempfile.TemporaryDirectory() as tmp:
        processes = []
        servers = []
        try:
            for c in contenders:
                process, url = serve(
                    args.model_repository,
                    Path(tmp) / f"{c.name}.log",
                    None if args.no_pin else args.server_cpu,
                    {**common, **c.env},
                    c.checkout,
                )
                processes.append(process)
                target = Target.from_url(url, args.model)
                servers.append(Server(c, target, process.pid))
            reports = asyncio.run(measure(servers, args))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)
    text = readme_table(reports, args, argv)
    print(text)
    if args.json_out is not None:
        args.json_out.write_bytes(
            orjson.dumps([asdict(r) for r in reports], option=orjson.OPT_INDENT_2)
        )
    if args.write_readme:
        write_section("overload", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
