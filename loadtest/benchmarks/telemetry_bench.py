"""Telemetry overhead: throughput of ``sluice serve`` with telemetry on and off.

    python -m loadtest.benchmarks.telemetry_bench [--model-repository models] [--model fraud]

Two servers run side by side on the same repository: "on" with the defaults
(Prometheus metrics and the HTTP middleware, drift against reference.json,
the feedback store, /metrics scraped every ``--scrape-s`` seconds; ``--on
VAR=VALUE`` changes it, e.g. metrics only) and "off"
with ``SLUICE_TELEMETRY=false SLUICE_DRIFT=false SLUICE_FEEDBACK=false``. The
load tester's closed loop (1-row JSON requests, ``--concurrency`` clients)
alternates between them for ``--rounds`` rounds; the medians and the on/off
ratio are printed. When the model is not built yet, a stand-in with the same
signature (and a reference profile) is trained into a temporary repository.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import yaml

from loadtest import Arm, BodySpec, ClosedLoad, Target, fetch_metadata, random_pool, run_compare
from server.core.monitoring.reference import build_reference
from server.core.repository import ModelRepository

SERVE = (sys.executable, "-m", "server", "serve")
OFF = {"SLUICE_TELEMETRY": "false", "SLUICE_DRIFT": "false", "SLUICE_FEEDBACK": "false"}


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


def serve(repo: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--model-repository", str(repo), "--port", str(port), "--log-level", "warning"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
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
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server not ready in 120 s:\n{log.read_text()}")


def scrape(url: str, every: float, stop: threading.Event) -> None:
    """What Prometheus would do to the "on" server."""
    with httpx.Client(timeout=10) as client:
        while not stop.wait(every):
            client.get(f"{url}/metrics")


async def compare(urls: dict[str, str], model: str, args: argparse.Namespace) -> dict[str, Any]:
    arms = {}
    for name, url in urls.items():
        target = Target.from_url(url, model)
        async with asyncio.timeout(30):
            meta = await fetch_metadata(target)
        arms[name] = Arm(target, random_pool(target, meta, BodySpec(rows_per_request=1)))
    load = ClosedLoad(concurrency=args.concurrency, duration=args.duration, warmup=args.warmup)
    result = await run_compare(arms["on"], arms["off"], load, rounds=args.rounds)
    on, off = result.median_a, result.median_b
    return {
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "on": on,
        "off": off,
        "on_rps_each": [r.ok_rps for r in result.runs_a],
        "off_rps_each": [r.ok_rps for r in result.runs_b],
        "ratio": on["ok_rps"] / off["ok_rps"] if off["ok_rps"] else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrape-s", type=float, default=5.0)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--on",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="extra environment for the 'on' server, e.g. --on SLUICE_DRIFT=false",
    )
    args = parser.parse_args(argv)
    on_env = dict(item.split("=", 1) for item in args.on)

    with tempfile.TemporaryDirectory() as tmp:
        repo = args.model_repository
        if not ModelRepository(repo).versions_on_disk(args.model):
            print(f"note: {args.model} is not built in {repo}; using a stand-in", file=sys.stderr)
            repo = stand_in(repo, args.model, Path(tmp) / "repo")
        servers = {
            "on": serve(repo, on_env, Path(tmp) / "on.log"),
            "off": serve(repo, OFF, Path(tmp) / "off.log"),
        }
        stop = threading.Event()
        scraper = threading.Thread(target=scrape, args=(servers["on"][1], args.scrape_s, stop))
        scraper.start()
        try:
            urls = {name: url for name, (_, url) in servers.items()}
            report = asyncio.run(compare(urls, args.model, args))
        finally:
            stop.set()
            scraper.join()
            for process, _ in servers.values():
                process.send_signal(signal.SIGINT)
                process.wait(30)
    for name in ("on", "off"):
        figures = report[name]
        print(
            f"telemetry {name:3}: {figures['ok_rps']:9.0f} req/s  p50 {figures['p50_ms']:.2f} ms"
            f"  p99 {figures['p99_ms']:.2f} ms"
        )
    print(
        f"on / off     : {report['ratio']:.3f}  ({args.rounds} rounds of {args.duration:.0f} s, "
        f"{args.concurrency} clients, 1-row requests; medians)"
    )
    if args.json_out is not None:
        args.json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
