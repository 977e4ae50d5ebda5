"""The load generator checked against wrk: same server, same body, same connections.

    python -m loadtest.benchmarks.wrk_check [--targets floor,sluice] [--write-readme]

For each target (the bare-HTTP floor app and Sluice on the fraud model) one
server runs pinned to one core; from the other core wrk (one thread, a Lua
script that POSTs one V2 body) and ``python -m loadtest``'s closed loop (the
same body, the same number of keep-alive connections) take turns for
``--rounds`` rounds. The medians and the ratio loadtest/wrk go to the terminal
and, with ``--write-readme``, into README.md. The harness passes when its
throughput is within ``--tolerance`` of wrk's on every target; the exit status
says so (0 pass, 1 miss, 2 cannot run).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.benchmarks import readme
from loadtest.benchmarks.serving_contenders import CONTENDERS, Setup, launch
from loadtest.benchmarks.serving_model import ModelData
from loadtest.benchmarks.serving_servers import Pinning, Server, ServerFailed, pin_self
from loadtest.bodies import BodySpec, random_pool
from loadtest.runner import run_closed
from loadtest.target import ModelMetadata, Target

SECTION = "wrk"
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_ERRORS = re.compile(r"Socket errors:\s+(.*)")
_P50 = re.compile(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}

LUA = """-- POST one pre-encoded V2 body on every request
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""


class WrkFailed(Exception):
    """wrk did not run or printed no rate; the message has its output."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: str | None


def parse_wrk(output: str) -> WrkResult:
    """The figures of one ``wrk --latency`` run."""
    rate = _RATE.search(output)
    if rate is None:
        raise WrkFailed(f"wrk printed no Requests/sec line:\n{output}")
    non_2xx = _NON_2XX.search(output)
    errors = _ERRORS.search(output)
    return WrkResult(
        float(rate.group(1)),
        _latency(_P50.search(output)),
        _latency(_P99.search(output)),
        int(non_2xx.group(1)) if non_2xx else 0,
        errors.group(1).strip() if errors else None,
    )


def _latency(match: re.Match[str] | None) -> float | None:
    return float(match.group(1)) * _UNIT_MS[match.group(2)] if match else None


@dataclass(slots=True)
class Pair:
    """One target's rounds."""

    name: str
    wrk: list[WrkResult] = field(default_factory=list)
    harness: list[float] = field(default_factory=list)
    harness_p50: list[float] = field(default_factory=list)
    harness_p99: list[float] = field(default_factory=list)
    harness_failed: int = 0

    @property
    def wrk_rps(self) -> float:
        return statistics.median(r.rps for r in self.wrk)

    @property
    def harness_rps(self) -> float:
        return statistics.median(self.harness)

    @property
    def ratio(self) -> float:
        return self.harness_rps / self.wrk_rps

    @property
    def wrk_failed(self) -> int:
        return sum(r.non_2xx for r in self.wrk) + sum(1 for r in self.wrk if r.socket_errors)


def run_wrk(
    url: str, script: Path, body: Path, args: argparse.Namespace, seconds: float, core: int | None
) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{args.concurrency}", f"-d{seconds:g}s", "--latency"]
    argv += ["-s", str(script), url]
    if core is not None:
        argv = ["taskset", "--cpu-list", str(core), *argv]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={"WRK_BODY": str(body), "PATH": "/usr/bin:/bin"},
        timeout=seconds + 30,
        check=False,
    )
    if done.returncode != 0:
        raise WrkFailed(f"wrk exited with {done.returncode}: {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def measure(
    name: str, server: Server, meta: ModelMetadata, args: argparse.Namespace, pinning: Pinning
) -> Pair:
    target = Target.from_url(server.url, args.model)
    pool = random_pool(target, meta, BodySpec(pool_size=1, seed=args.seed))
    request = pool.requests[0]
    body = request.partition(b"\r\n\r\n")[2]
    pair = Pair(name)
    with tempfile.TemporaryDirectory() as tmp:
        script, body_file = Path(tmp) / "post.lua", Path(tmp) / "body.json"
        script.write_text(LUA)
        body_file.write_bytes(body)
        url = f"{server.url}{target.infer_path}"
        run_wrk(url, script, body_file, args, args.warmup, pinning.client)  # warm-up
        for round_no in range(1, args.rounds + 1):
            wrk = run_wrk(url, script, body_file, args, args.duration, pinning.client)
            pair.wrk.append(wrk)
            run = asyncio.run(
                run_closed(target, pool, args.concurrency, args.duration, args.warmup)
            )
            pair.harness.append(run.ok_rps)
            pair.harness_p50.append(run.latency.p50_ms)
            pair.harness_p99.append(run.latency.p99_ms)
            pair.harness_failed += run.failed
            print(
                f"{name} round {round_no}: wrk {wrk.rps:,.0f} req/s, loadtest {run.ok_rps:,.0f} "
                f"req/s ({run.ok_rps / wrk.rps:.3f}); load generator {run.client_cpu_util:.0%} "
                "of its core",
                flush=True,
            )
    return pair


def table(pairs: list[Pair], args: argparse.Namespace, pinning: Pinning, argv: list[str]) -> str:
    lines = [
        "| target | wrk req/s | loadtest req/s | loadtest / wrk | p50 wrk / loadtest | "
        "p99 wrk / loadtest |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for pair in pairs:
        p50 = statistics.median(r.p50_ms for r in pair.wrk if r.p50_ms is not None)
        p99 = statistics.median(r.p99_ms for r in pair.wrk if r.p99_ms is not None)
        lines.append(
            f"| {pair.name} | {pair.wrk_rps:,.0f} | {pair.harness_rps:,.0f} | "
            f"**{pair.ratio:.3f}** | {p50:.2f} / {statistics.median(pair.harness_p50):.2f} ms | "
            f"{p99:.2f} / {statistics.median(pair.harness_p99):.2f} ms |"
        )
    lines += [
        "",
        f"Medians of {args.rounds} alternating rounds of {args.duration:g} s, "
        f"{args.concurrency} keep-alive connections, one 1-row V2 JSON body, wrk with one "
        f"thread; {pinning.note}. Pass: within {args.tolerance:.0%} of wrk on every target. "
        f"Produced by {readme.provenance(argv)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--targets", default="floor,sluice")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or set(targets) - {"floor", "sluice"}:
        parser.error("--targets takes floor and/or sluice")
    if shutil.which("wrk") is None:
        print("wrk_check: error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    pinning = Pinning.detect(not args.no_pin)
    pin_self(pinning.client)
    data = ModelData.load(args.model_repository, args.model)
    contenders = {c.key: c for c in CONTENDERS}
    pairs: list[Pair] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Started as the serving benchmark starts them; the bodies come from the model's config.
        setup = Setup(data.repository, data.name, data.version, data.artifact, Path(tmp))
        try:
            for key in targets:
                command = launch(contenders[key], setup).command
                with Server(key, command, Path(tmp) / f"{key}.log", pinning) as server:
                    server.wait_ready(f"/v2/models/{data.name}/ready", 120)
                    pairs.append(measure(key, server, data.meta, args, pinning))
        except (ServerFailed, WrkFailed) as exc:
            print(f"wrk_check: error: {exc}", file=sys.stderr)
            return 2
    text = table(pairs, args, pinning, sys.argv[1:] if argv is None else argv)
    print(text)
    failed = [p for p in pairs if p.wrk_failed or p.harness_failed]
    for pair in failed:
        print(
            f"wrk_check: {pair.name}: failed requests (wrk {pair.wrk_failed}, "
            f"loadtest {pair.harness_failed}); the comparison is void",
            file=sys.stderr,
        )
    if args.write_readme and not failed:
        readme.write_section(SECTION, text)
    passed = not failed and all(abs(p.ratio - 1) <= args.tolerance for p in pairs)
    print("PASS" if passed else "MISS", "harness throughput vs wrk")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
