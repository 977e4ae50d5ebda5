"""Telemetry overhead: throughput and server CPU per request with telemetry on and off.

    python -m loadtest.benchmarks.telemetry_bench [--model-repository models] [--model fraud]
        [--rounds 5] [--write-readme]

Two servers run side by side on the same repository: "on" with the defaults
(Prometheus metrics and the HTTP middleware, drift against reference.json,
the feedback store, /metrics scraped every ``--scrape-s`` seconds; ``--on
VAR=VALUE`` changes it, e.g. metrics only) and "off" with
``SLUICE_TELEMETRY=false SLUICE_DRIFT=false SLUICE_FEEDBACK=false``. Both
servers are pinned to ``--server-cpu`` and this process (the load generator and
the scraper) to ``--client-cpu``. The load tester's closed loop (1-row JSON
requests, ``--concurrency`` clients) alternates between them for ``--rounds``
rounds.

Two figures per side, medians over the rounds:

- throughput: answered requests/s in the measured window;
- server CPU per request: the server process's user + system CPU time (from
  ``/proc/<pid>/stat``, every thread) over the run, divided by the requests its
  own statistics endpoint counted over the same run. It does not depend on
  how fast the load generator keeps up, but a busy neighbour still inflates it
  (shared caches; a VM may not account stolen time), hence the next figure.

Both ratios are also given as the median of the per-round ratios (each pair of
runs is back to back), with the CPU the rest of the machine used meanwhile
(``/proc/stat`` minus the server and this process), so a contended run shows.

With ``--write-readme`` the table goes into README.md between the
``bench:telemetry`` markers. When the model is not built yet, a stand-in with
the same signature (and a reference profile) is trained into a temporary
repository.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import yaml

from loadtest import BodySpec, ClosedLoad, RunResult, Target, fetch_metadata, random_pool, run_load
from loadtest.benchmarks.readme import provenance, write_section
from server.core.monitoring.reference import build_reference
from server.core.repository import ModelRepository

SERVE = (sys.executable, "-m", "server", "serve")
OFF = {"SLUICE_TELEMETRY": "false", "SLUICE_DRIFT": "false", "SLUICE_FEEDBACK": "false"}
TICKS = os.sysconf("SC_CLK_TCK")


def stand_in(source: Path, model: str, root: Path) -> Path:
    """An XGBoost model with ``model``'s signature, trained on random rows, with reference.json."""
    import xgboost as xgb

    config = yaml.safe_load((source / model / "model.yaml").read_text())
    names = config["inputs"][0]["feature_names"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, len(names))).astype(np.float32)
    y = (x[:, 0] + x[:, 1] + rng.logistic(size=len(x)) > 0).astype(np.float32)
    folder = root / model / "1"
    folder.mkdir(parents=True)
    config["version_policy"] = {"latest": 1}
    (root / model / "model.yaml").write_text(yaml.safe_dump(config))
    params = {"objective": "binary:logistic", "max_depth": 6, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(x, label=y, feature_names=names), 100)
    booster.save_model(str(folder / "model.ubj"))
    scores = booster.predict(xgb.DMatrix(x, feature_names=names))
    output = config["outputs"][0]["name"]
    features = {n: x[:, i] for i, n in enumerate(names)}
    reference = build_reference(model, 1, features, {output: (scores, None)})
    (folder / "reference.json").write_bytes(orjson.dumps(reference))
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@dataclass(slots=True)
class Server:
    """One ``sluice serve`` child and what it measured, round by round."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    runs: list[RunResult] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)  # cores busy with anything else
    busy: list[float] = field(default_factory=list)  # the server's share of its core

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far, all threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


def serve(name: str, repo: Path, env: dict[str, str], log: Path, cpu: int | None) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--model-repository", str(repo), "--port", str(port), "--log-level", "warning"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        # Pinned before exec, so every thread the server ever starts inherits it.
        preexec_fn=(lambda: pin(cpu)) if cpu is not None else None,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return Server(name, process, url)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server not ready in 120 s:\n{log.read_text()}")


def scrape(url: str, every: float, stop: threading.Event) -> None:
    """What Prometheus would do to the "on" server."""
    with httpx.Client(timeout=10) as client:
        while not stop.wait(every):
            client.get(f"{url}/metrics")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all CPUs, from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def answered(client: httpx.AsyncClient, url: str, model: str) -> int:
    """Requests the server's statistics extension says it answered or failed, all versions."""
    response = await client.get(f"{url}/v2/models/{model}/stats")
    response.raise_for_status()
    return sum(
        s["inference_stats"]["success"]["count"] + s["inference_stats"]["fail"]["count"]
        for s in response.json()["model_stats"]
    )


async def measure(servers: list[Server], model: str, args: argparse.Namespace) -> None:
    """``args.rounds`` alternating runs of every server; CPU per request around each."""
    pools = {}
    for server in servers:
        target = Target.from_url(server.url, model)
        async with asyncio.timeout(30):
            meta = await fetch_metadata(target)
        pools[server.name] = (target, random_pool(target, meta, BodySpec(rows_per_request=1)))
    load = ClosedLoad(concurrency=args.concurrency, duration=args.duration, warmup=args.warmup)
    async with httpx.AsyncClient(timeout=10) as client:
        for round_no in range(args.rounds):
            for server in servers:
                target, pool = pools[server.name]
                requests = await answered(client, server.url, model)
                cpu, busy, own = server.cpu_s(), machine_busy_s(), own_cpu_s()
                started = time.monotonic()
                run = await run_load(target, pool, load)
                cpu = server.cpu_s() - cpu
                wall = time.monotonic() - started
                foreign = machine_busy_s() - busy - cpu - (own_cpu_s() - own)
                requests = await answered(client, server.url, model) - requests
                server.runs.append(run)
                server.cpu_us.append(cpu / requests * 1e6 if requests else float("nan"))
                server.foreign.append(max(foreign, 0.0) / wall)
                server.busy.append(cpu / wall)
                print(
                    f"round {round_no + 1} {server.name:3}: {run.ok_rps:8.0f} req/s, "
                    f"{server.cpu_us[-1]:6.1f} us CPU/request, p99 {run.latency.p99_ms:.2f} ms, "
                    f"server {server.busy[-1]:.0%} busy, load generator "
                    f"{run.client_cpu_util:.0%}, other load {server.foreign[-1]:.2f} cores",
                    file=sys.stderr,
                )


def summary(server: Server) -> dict[str, Any]:
    return {
        "ok_rps": statistics.median(r.ok_rps for r in server.runs),
        "cpu_us_per_request": statistics.median(server.cpu_us),
        "p50_ms": statistics.median(r.latency.p50_ms for r in server.runs),
        "p99_ms": statistics.median(r.latency.p99_ms for r in server.runs),
        "ok_rps_each": [r.ok_rps for r in server.runs],
        "cpu_us_each": server.cpu_us,
        "other_load_cores_each": server.foreign,
        "server_busy_each": server.busy,
        "load_generator_busy_each": [r.client_cpu_util for r in server.runs],
    }


def paired(on: list[float], off: list[float]) -> float:
    """Median of the per-round ratios: each pair ran back to back, so slow drifts cancel."""
    return statistics.median(a / b for a, b in zip(on, off, strict=True) if b)


def readme_table(report: dict[str, Any], argv: list[str] | None) -> str:
    on, off = report["on"], report["off"]
    lines = [
        "| telemetry | req/s | server CPU per request | p50 | p99 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, figures in (("on (defaults)", on), ("off", off)):
        lines.append(
            f"| {label} | {figures['ok_rps']:,.0f} | {figures['cpu_us_per_request']:.0f} µs "
            f"| {figures['p50_ms']:.2f} ms | {figures['p99_ms']:.2f} ms |"
        )
    prose = (
        f"Medians of {report['rounds']} alternating rounds of {report['duration_s']:g} s, "
        f"{report['concurrency']} clients, 1-row JSON requests to `{report['model']}`; server "
        'and load generator on different cores. "On" is the default configuration: '
        f"Prometheus metrics (scraped every {report['scrape_s']:g} s), drift, data quality "
        "and the feedback store; tracing is off by default. Server CPU per request: the "
        "server process's user + system time over the requests it answered. Median of the "
        f"per-round ratios: {report['ratio_paired']:.2f} throughput, "
        f"{report['cpu_ratio_paired']:.2f} CPU; other load on the machine meanwhile: "
        f"{report['other_load_cores']:.2f} cores."
    )
    lines += [
        f"| **on / off** | **{report['ratio']:.2f}** | **{report['cpu_ratio']:.2f}** | | |",
        "",
        textwrap.fill(prose, width=80),
        "",
        textwrap.fill(provenance(argv), width=80, break_long_words=False),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrape-s", type=float, default=5.0)
    parser.add_argument("--server-cpu", type=int, default=1, help="pin both servers here")
    parser.add_argument("--client-cpu", type=int, default=0, help="pin the load generator here")
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the OS")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--write-readme", action="store_true", help="put the table into README.md's section"
    )
    parser.add_argument(
        "--on",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="extra environment for the 'on' server, e.g. --on SLUICE_DRIFT=false",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    on_env = dict(item.split("=", 1) for item in args.on)
    server_cpu = None if args.no_pin else args.server_cpu
    pin(None if args.no_pin else args.client_cpu)

    with tempfile.TemporaryDirectory() as tmp:
        repo = args.model_repository
        if not ModelRepository(repo).versions_on_disk(args.model):
            print(f"note: {args.model} is not built in {repo}; using a stand-in", file=sys.stderr)
            repo = stand_in(repo, args.model, Path(tmp) / "repo")
        servers = [
            serve("on", repo, on_env, Path(tmp) / "on.log", server_cpu),
            serve("off", repo, OFF, Path(tmp) / "off.log", server_cpu),
        ]
        stop = threading.Event()
        scraper = threading.Thread(target=scrape, args=(servers[0].url, args.scrape_s, stop))
        scraper.start()
        try:
            asyncio.run(measure(servers, args.model, args))
        finally:
            stop.set()
            scraper.join()
            for server in servers:
                server.process.send_signal(signal.SIGINT)
                server.process.wait(30)
    on, off = summary(servers[0]), summary(servers[1])
    report = {
        "model": args.model,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "scrape_s": args.scrape_s,
        "on_env": on_env,
        "on": on,
        "off": off,
        "ratio": on["ok_rps"] / off["ok_rps"] if off["ok_rps"] else float("nan"),
        "cpu_ratio": (
            on["cpu_us_per_request"] / off["cpu_us_per_request"]
            if off["cpu_us_per_request"]
            else float("nan")
        ),
        "ratio_paired": paired(on["ok_rps_each"], off["ok_rps_each"]),
        "cpu_ratio_paired": paired(on["cpu_us_each"], off["cpu_us_each"]),
        "other_load_cores": statistics.median(
            on["other_load_cores_each"] + off["other_load_cores_each"]
        ),
    }
    for name, figures in (("on", on), ("off", off)):
        print(
            f"telemetry {name:3}: {figures['ok_rps']:9.0f} req/s  "
            f"{figures['cpu_us_per_request']:6.1f} us CPU/request  "
            f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms"
        )
    print(
        f"on / off     : {report['ratio']:.3f} throughput, {report['cpu_ratio']:.3f} CPU/request "
        f"({args.rounds} rounds of {args.duration:g} s, {args.concurrency} clients, "
        "1-row requests; medians)"
    )
    print(
        f"paired rounds: {report['ratio_paired']:.3f} throughput, "
        f"{report['cpu_ratio_paired']:.3f} CPU/request (median of per-round ratios); "
        f"other load on the machine: {report['other_load_cores']:.2f} cores (median)"
    )
    if args.json_out is not None:
        args.json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if args.write_readme:
        write_section("telemetry", readme_table(report, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
