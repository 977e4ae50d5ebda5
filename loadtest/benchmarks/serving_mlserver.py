"""MLServer for the serving benchmark: its own virtual environment, its settings files.

The environment (``.bench/mlserver-venv``) is created on first use with pip
from PyPI and reused while its stamp names the same packages. Any failure
(no network, no wheel) becomes ``Unavailable`` with the reason, so the suite
goes on without MLServer.

Configuration, chosen to be fair and documented in the report: 127.0.0.1 and
three free ports (HTTP, gRPC, metrics); ``debug`` off (MLServer's default is
on, which turns on the access log: the other servers run without one);
metrics, gzip and everything else at their defaults; ``parallel_workers`` as
given (0 by default: inference in the server process, since the server gets
one core and a worker process there only adds a hop through a queue; on the
2-core development machine 0 gave about 1,000 req/s at 1 client against
100-500 with 1 worker, and more at 64 clients too);
adaptive batching off (``max_batch_size`` 0) or on with the given size and
time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.benchmarks.serving_servers import ServerCommand, Unavailable, free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".bench" / "mlserver-venv"
# uvloop 0.22 broke MLServer 1.7.1's worker processes (SeldonIO/MLServer#2286).
PACKAGES = ("mlserver==1.7.1", "mlserver-xgboost==1.7.1", "uvloop<0.22")
STAMP = ".sluice-bench-stamp"
INSTALL_TIMEOUT_S = 1200.0
OUTPUT = "predict"


@dataclass(frozen=True, slots=True)
class MLServerEnv:
    """A usable environment: where it is and what getting it cost this time."""

    venv: Path
    packages: tuple[str, ...]
    install_s: float
    reused: bool

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "mlserver"


@dataclass(frozen=True, slots=True)
class MLServerConfig:
    """The knobs the benchmark turns; the rest stays at MLServer's defaults."""

    parallel_workers: int = 0
    max_batch_size: int = 0
    max_batch_time_s: float = 0.0


def ensure_env(
    venv: Path = VENV, packages: tuple[str, ...] = PACKAGES, log: Path | None = None
) -> MLServerEnv:
    """The environment at ``venv``, installed first unless its stamp matches ``packages``."""
    wanted = "\n".join(packages)
    stamp = venv / STAMP
    if stamp.is_file() and stamp.read_text() == wanted and (venv / "bin" / "mlserver").is_file():
        return MLServerEnv(venv, packages, 0.0, True)
    log = log or venv.parent / "mlserver-install.log"
    started = time.perf_counter()
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        _step([sys.executable, "-m", "venv", str(venv)], log, "creating its virtual environment")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages]
        _step(pip, log, f"pip install {' '.join(packages)}")
        stamp.write_text(wanted)
    except OSError as exc:
        raise Unavailable(f"cannot install into {venv}: {exc}") from exc
    return MLServerEnv(venv, packages, time.perf_counter() - started, False)


def _step(argv: list[str], log: Path, what: str) -> None:
    with log.open("ab") as handle:
        try:
            done = subprocess.run(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{what} took over {INSTALL_TIMEOUT_S:g} s (log: {log})") from None
    if done.returncode != 0:
        raise Unavailable(f"{what} failed with exit code {done.returncode} (log: {log})")


def write_settings(
    workdir: Path, model: str, version: str, artifact: Path, config: MLServerConfig
) -> tuple[int, dict[str, object]]:
    """settings.json and ``model/model-settings.json`` under ``workdir``; the HTTP port."""
    http_port = free_port()
    server = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": config.parallel_workers,
        "debug": False,
    }
    model_settings: dict[str, object] = {
        "name": model,
        "implementation": "mlserver_xgboost.XGBoostModel",
        "parameters": {"uri": str(artifact.resolve()), "version": version},
        "max_batch_size": config.max_batch_size,
        "max_batch_time": config.max_batch_time_s,
    }
    (workdir / model).mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(server, indent=2))
    (workdir / model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return http_port, {"settings": server, "model_settings": model_settings}


def command(env: MLServerEnv, workdir: Path, port: int) -> ServerCommand:
    """``mlserver start`` on the folder that ``write_settings`` filled."""
    return ServerCommand([str(env.executable), "start", str(workdir)], port, cwd=workdir)
