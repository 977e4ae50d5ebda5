"""Client latency while the server reloads models and scores shadows, against none of it.

    python -m loadtest.benchmarks.rollout_bench [--model-repository models] [--model fraud]
        [--rate 5400] [--duration 20] [--rounds 5] [--reloads 6] [--write-readme]

One ``sluice serve`` (pinned to ``--server-cpu``; the load generator on
``--client-cpu``) serves a copy of the model's folder. Each round runs an
open loop at ``--rate`` req/s for ``--duration`` s in each of three modes, in
turn, so that a busy moment on the shared machine falls on all of them:

- ``steady``: nothing else happens;
- ``reloading``: ``--reloads`` times during the run, the served version's
  artifact is swapped for another version's and ``POST
  /v2/repository/models/{model}/load`` rebuilds it (a real rebuild: hashing,
  booster, tree conversion in a child process, parity check, executor
  timings, test batch), then the swap is undone on the next reload;
- ``shadow``: the traffic document copies every request (``sample`` 1.0) to
  another version, scored off the hot path.

Reported per mode: medians over the rounds of p50 and p99 (from the intended
send time, so a stall shows), their ratio to ``steady`` (the median of the
ratios within a round: the machine's speed drifts more between rounds than
within one), and every answer that was not a 200. With ``--write-readme`` the
table goes into README.md between the ``bench:rollout`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

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
from loadtest.benchmarks.overload_bench import pin, serve
from loadtest.benchmarks.readme import with_notes, write_section

MODES = ("steady", "reloading", "shadow")


@dataclass(slots=True)
class Figures:
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    not_ok: int = 0
    answered: int = 0
    reloads: int = 0


def copy_model(source: Path, model: str, into: Path) -> tuple[Path, int, int]:
    """The model folder copied to ``into``; its served (highest) version and another one."""
    shutil.copytree(source / model, into / model, ignore=shutil.ignore_patterns(".*"))
    versions = sorted(int(p.name) for p in (into / model).iterdir() if p.name.isdigit())
    if len(versions) < 2:
        raise SystemExit(f"{model} needs two versions (the reload swaps their artifacts)")
    return into / model, versions[-1], versions[-2]


class Reloader:
    """Swaps the served version's artifact with another's and reloads, ``count`` times."""

    def __init__(self, folder: Path, served: int, other: int, url: str, model: str) -> None:
        artifact = next(p for p in (folder / str(served)).iterdir() if p.name.startswith("model."))
        self._artifact = artifact
        self._original = artifact.read_bytes()
        self._other = (folder / str(other) / artifact.name).read_bytes()
        self._swapped = False
        self._url = f"{url}/v2/repository/models/{model}/load"

    async def run(self, count: int, duration: float) -> int:
        done = 0
        async with httpx.AsyncClient(timeout=120) as client:
            for _ in range(count):
                await asyncio.sleep(duration / (count + 1))  # spread over the run
                self._swapped = not self._swapped
                self._artifact.write_bytes(self._other if self._swapped else self._original)
                response = await client.post(self._url, json={})
                if response.status_code != 200:
                    raise SystemExit(f"reload answered {response.status_code}: {response.text}")
                done += 1
        return done


async def one_run(target: Target, pool: RequestPool, args: argparse.Namespace) -> RunResult:
    load = OpenLoad(rate=args.rate, duration=args.duration, warmup=1.0, connections=64)
    return await run_load(target, pool, load)


async def measure(
    url: str, folder: Path, served: int, other: int, args: argparse.Namespace
) -> dict[str, Figures]:
    target = Target.from_url(url, args.model)
    async with asyncio.timeout(30):
        meta = await fetch_metadata(target)
    pool = random_pool(target, meta, BodySpec(rows_per_request=1))
    await run_load(target, pool, ClosedLoad(concurrency=64, duration=args.warmup_s, warmup=0.0))
    reloader = Reloader(folder, served, other, url, args.model)
    traffic = f"{url}/v2/models/{args.model}/traffic"
    shadowed = {"primary": str(served), "shadows": [{"version": str(other), "sample": 1.0}]}
    figures = {mode: Figures() for mode in MODES}
    async with httpx.AsyncClient(timeout=30) as client:
        for round_ in range(args.rounds):
            for mode in MODES:
                if mode == "shadow":
                    (await client.put(traffic, json=shadowed)).raise_for_status()
                reloads = None
                if mode == "reloading":
                    reloads = asyncio.create_task(reloader.run(args.reloads, args.duration))
                run = await one_run(target, pool, args)
                if reloads is not None:
                    figures[mode].reloads += await reloads
                if mode == "shadow":
                    (await client.put(traffic, json={"primary": str(served)})).raise_for_status()
                f = figures[mode]
                f.p50_ms.append(run.latency.p50_ms)
                f.p99_ms.append(run.latency.p99_ms)
                f.answered += sum(run.statuses.values())
                f.not_ok += sum(n for s, n in run.statuses.items() if s != 200)
                f.not_ok += sum(run.errors.values())
                print(
                    f"round {round_ + 1} {mode}: p50 {run.latency.p50_ms:.2f} ms, "
                    f"p99 {run.latency.p99_ms:.2f} ms, statuses {dict(run.statuses)}, "
                    f"errors {dict(run.errors)}",
                    file=sys.stderr,
                )
    return figures


def within(mode: list[float], steady: list[float]) -> float:
    """The median over the rounds of a mode's figure against steady's in the same round."""
    return statistics.median(m / s for m, s in zip(mode, steady, strict=True))


def table(figures: dict[str, Figures], args: argparse.Namespace, argv: list[str] | None) -> str:
    steady = figures["steady"]
    lines = [
        "| mode | p50 | p99 | p50 / steady | p99 / steady | answers | not 200 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        f = figures[mode]
        p50, p99 = statistics.median(f.p50_ms), statistics.median(f.p99_ms)
        lines.append(
            f"| {mode} | {p50:.2f} ms | {p99:.2f} ms | {within(f.p50_ms, steady.p50_ms):.2f}x "
            f"| {within(f.p99_ms, steady.p99_ms):.2f}x | {f.answered:,} | {f.not_ok} |"
        )
    prose = (
        f"`{args.model}`, 1-row JSON requests, open loop at {args.rate:,.0f} req/s for "
        f"{args.duration:g} s per mode and round, medians of {args.rounds} rounds (modes "
        "alternated; a ratio is the median of the ratios within a round, where the modes ran "
        f"back to back). reloading: {figures['reloading'].reloads} full rebuilds of the served "
        f"version in all ({args.reloads} per run). shadow: every request also scored by "
        "another version. Server and load generator pinned to different cores."
    )
    return with_notes(lines, prose, argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument(
        "--rate", type=float, default=5400.0, help="requests per second (the issue's figure)"
    )
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reloads", type=int, default=6, help="per reloading run")
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    pin(None if args.no_pin else args.client_cpu)
    with tempfile.TemporaryDirectory() as tmp:
        folder, served, other = copy_model(args.model_repository, args.model, Path(tmp) / "repo")
        process, url = serve(
            folder.parent,
            Path(tmp) / "server.log",
            None if args.no_pin else args.server_cpu,
            {},
        )
        try:
            figures = asyncio.run(measure(url, folder, served, other, args))
        finally:
            process.terminate()
            process.wait(60)
    text = table(figures, args, argv)
    print(text)
    if args.write_readme:
        write_section("rollout", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
