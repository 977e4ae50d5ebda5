"""Result-cache benchmark: what a hit costs against the bare-HTTP floor, what a miss costs.

    python -m loadtest.benchmarks.cache_bench [--rounds 3] [--duration 8] [--write-readme]

Three servers, each pinned to core 1 with the load generator (this process,
the ``loadtest`` library) on core 0, started once and measured in alternating rounds so a
drift in machine speed hits all of them:

- ``floor``: Starlette + orjson answering a fixed body, no model (the
  serving benchmark's floor);
- ``sluice``: ``sluice serve`` on fraud v2 with the cache off;
- ``sluice-cache``: the same with ``cache: {enabled: true}`` in a copy of
  fraud's model.yaml (the version folders are linked, not copied).

Two workloads, 1-row JSON requests from 64 closed-loop clients:

- ``repeat``: 64 distinct holdout rows over and over, so once warm every
  request of ``sluice-cache`` is a hit. Target: the hit path >= 80 % of the floor;
- ``distinct``: random rows that never repeat in a round (a fresh seed per
  round and more bodies than requests), so every lookup of ``sluice-cache``
  misses and inserts. Target: cache on >= 95 % of cache off.

Each figure is the median over the rounds. A ratio is the median over the
rounds of the ratio within a round, where the contenders ran back to back:
on a machine shared with other work, the speed drifts more between rounds
than within one.

The speed of this machine also drifts within seconds (the same server, alone,
spent 82 to 143 CPU µs per answer in consecutive 6 s runs), which makes one
back-to-back pair of ``distinct`` runs a coin toss at the 5 % the target is
about. So each round also runs ``distinct`` on ``sluice`` and
``sluice-cache`` at the same time (``distinct-paired``: two sets of 64 clients
from this process, both servers on the one server core): the core's
scheduler shares it between them, so the ratio of their throughputs is the
ratio of what an answer costs each, under the same drift.

Beside throughput, each server's CPU time per answered request (from
``/proc``, all its threads, over the measured window): what a request costs
the server whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from loadtest import BodySpec, RequestPool, RunResult, Target, random_pool, rows_pool, run_closed
from loadtest.benchmarks.readme import provenance, write_section
from loadtest.benchmarks.serving_contenders import CONTENDERS, Setup, launch
from loadtest.benchmarks.serving_model import ModelData
from loadtest.benchmarks.serving_servers import Pinning, Server, pin_self

ROOT = Path(__file__).resolve().parents[2]
CONTENDER_KEYS = ("floor", "sluice", "sluice-cache")
WORKLOADS = ("repeat", "distinct")
PAIRED = "distinct-paired"  # sluice and sluice-cache at once, sharing the server core


@dataclass(slots=True)
class Figures:
    """Per contender and workload: throughput, p99 and CPU per answer of each round."""

    rps: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    p99_ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu_us: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, key: tuple[str, str], result: dict[str, Any], cpu_us: float) -> None:
        self.rps.setdefault(key, []).append(float(result["ok_rps"]))
        self.p99_ms.setdefault(key, []).append(float(result["latency"]["p99_ms"]))
        self.cpu_us.setdefault(key, []).append(cpu_us)

    def median(self, contender: str, workload: str) -> tuple[float, float]:
        key = (contender, workload)
        return statistics.median(self.rps[key]), statistics.median(self.p99_ms[key])

    def cpu(self, contender: str, workload: str) -> float:
        return statistics.median(self.cpu_us[(contender, workload)])

    def ratio(self, over: str, under: str, workload: str) -> float:
        """Median over the rounds of ``over``'s throughput / ``under``'s in the same round."""
        pairs = zip(self.rps[(over, workload)], self.rps[(under, workload)], strict=True)
        return statistics.median(a / b for a, b in pairs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pool(target: Target, data: ModelData, workload: str, seed: int, size: int) -> RequestPool:
    """The bodies of one round: 64 holdout rows, or ``size`` random rows seeded per round."""
    if workload == "repeat":
        return rows_pool(target, data.meta, data.rows.slice(0, 64), BodySpec(pool_size=64))
    return random_pool(target, data.meta, BodySpec(pool_size=size, seed=seed))


async def measure(
    targets: list[Target], pools: list[RequestPool], args: argparse.Namespace, pids: list[int]
) -> list[tuple[RunResult, float]]:
    """Each server's run and CPU µs per answer over the measured window, all loaded at
    once (one server: a run of its own)."""
    started: list[list[float]] = []

    async def mark() -> None:
        await asyncio.sleep(args.warmup)
        started.append([cpu_seconds(pid) for pid in pids])

    marker = asyncio.create_task(mark())
    runs = await asyncio.gather(
        *(
            run_closed(t, b, 64, args.duration, args.warmup)
            for t, b in zip(targets, pools, strict=True)
        )
    )
    spent = [cpu_seconds(pid) for pid in pids]
    await marker
    return [
        (run, (after - before) / max(1, run.ok) * 1e6)
        for run, after, before in zip(runs, spent, started[0], strict=True)
    ]


def readme_table(figures: Figures, argv: list[str]) -> str:
    lines = [
        "| workload (1 row, 64 clients) | floor req/s | Sluice, cache off | Sluice, cache on "
        "| cache on / floor | cache on / off | CPU µs per answer: floor, off, on "
        "| p99 off / on (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        floor, _ = figures.median("floor", workload)
        off, off_p99 = figures.median("sluice", workload)
        on, on_p99 = figures.median("sluice-cache", workload)
        cpu = ", ".join(f"{figures.cpu(c, workload):.0f}" for c in CONTENDER_KEYS)
        lines.append(
            f"| {workload} | {floor:,.0f} | {off:,.0f} | {on:,.0f} "
            f"| {figures.ratio('sluice-cache', 'floor', workload):.2f} "
            f"| {figures.ratio('sluice-cache', 'sluice', workload):.2f} | {cpu} "
            f"| {off_p99:.2f} / {on_p99:.2f} |"
        )
    paired = figures.ratio("sluice-cache", "sluice", PAIRED)
    off, _ = figures.median("sluice", PAIRED)
    on, _ = figures.median("sluice-cache", PAIRED)
    cpu = ", ".join(f"{figures.cpu(c, PAIRED):.0f}" for c in CONTENDER_KEYS[1:])
    lines.append(
        f"| distinct, off and on at once on one core | | {off:,.0f} | {on:,.0f} | "
        f"| {paired:.2f} | -, {cpu} | |"
    )
    repeat_share = figures.ratio("sluice-cache", "floor", "repeat")
    distinct = figures.ratio("sluice-cache", "sluice", "distinct")
    by_cpu = figures.cpu("floor", "repeat") / figures.cpu("sluice-cache", "repeat")
    miss_cpu = figures.cpu("sluice-cache", "distinct") / figures.cpu("sluice", "distinct") - 1
    lines += [
        "",
        f"Targets: cache hits >= 0.80 of the floor ({'met' if repeat_share >= 0.8 else 'missed'}: "
        f"{repeat_share:.2f}); misses cost at most 5 % against no cache "
        f"({'met' if distinct >= 0.95 else 'missed'}: {distinct:.2f} back to back, "
        f"{'met' if paired >= 0.95 else 'missed'}: {paired:.2f} at once). In server CPU per "
        f"answer, a hit costs {1 / by_cpu:.2f} times a floor answer ({by_cpu:.2f} of its rate "
        f"on a core of its own) and a miss {100 * miss_cpu:+.0f} % against no cache.",
        "",
        provenance(argv),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.benchmarks.cache_bench")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--distinct-pool", type=int, default=250_000, help="bodies per round")
    parser.add_argument("--write-readme", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    data = ModelData.load(args.model_repository, args.model)
    pinning = Pinning.detect()
    pin_self(pinning.client)
    figures = Figures()
    by_key = {c.key: c for c in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="sluice-cache-bench-") as tmp:
        work = Path(tmp)
        setup = Setup(args.model_repository, data.name, data.version, data.artifact, work)
        servers = []
        try:
            for key in CONTENDER_KEYS:
                command = launch(by_key[key], setup).command
                server = Server(key, command, work / f"{key}.log", pinning)
                servers.append(server)
                server.wait_ready(f"/v2/models/{data.name}/ready", 120)
            for round_number in range(args.rounds):
                for workload in WORKLOADS:
                    for server in servers:
                        target = Target.from_url(server.url, data.name)
                        bodies = pool(target, data, workload, round_number, args.distinct_pool)
                        [(run, cpu_us)] = uvloop.run(
                            measure([target], [bodies], args, [server.process.pid])
                        )
                        result = run.to_dict()
                        figures.add((server.name, workload), result, cpu_us)
                        p99 = result["latency"]["p99_ms"]
                        print(
                            f"round {round_number + 1} {workload:8} {server.name:12} "
                            f"{result['ok_rps']:>9,.0f} req/s  p99 {p99:.2f} ms  "
                            f"{cpu_us:.1f} CPU µs per answer",
                            flush=True,
                        )
                pair = [s for s in servers if s.name != "floor"]
                targets = [Target.from_url(s.url, data.name) for s in pair]
                pools = [
                    pool(t, data, "distinct", 1000 + round_number, args.distinct_pool)
                    for t in targets
                ]
                pids = [s.process.pid for s in pair]
                both = uvloop.run(measure(targets, pools, args, pids))
                for server, (run, cpu_us) in zip(pair, both, strict=True):
                    result = run.to_dict()
                    figures.add((server.name, PAIRED), result, cpu_us)
                    print(
                        f"round {round_number + 1} paired   {server.name:12} "
                        f"{result['ok_rps']:>9,.0f} req/s  {cpu_us:.1f} CPU µs per answer",
                        flush=True,
                    )
        finally:
            for server in servers:
                server.stop()
    table = readme_table(figures, argv)
    print(table)
    if args.write_readme:
        write_section("cache", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
