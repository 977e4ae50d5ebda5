"""The servers the serving benchmark compares, and how each one is started.

One table, ``CONTENDERS``; each kind has one builder in ``BUILDERS`` that turns
a contender and the run's ``Setup`` into a command line plus the configuration
it records in the results.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loadtest.benchmarks import serving_mlserver as mlserver
from loadtest.benchmarks.serving_servers import ServerCommand, Unavailable, free_port

Kind = Literal["floor", "fastapi", "mlserver", "sluice"]

UVICORN = ("--loop", "uvloop", "--http", "httptools", "--workers", "1", "--no-access-log")


@dataclass(frozen=True, slots=True)
class Contender:
    """One server configuration in the comparison."""

    key: str
    label: str
    kind: Kind
    output: str = "probability"
    batching: bool = False
    cache: bool = False
    binary: bool = False  # speaks the binary tensor extension
    checked: bool = True  # answers compared with in-process predictions before measuring


CONTENDERS: tuple[Contender, ...] = (
    Contender("floor", "floor (Starlette)", "floor", binary=True, checked=False),
    Contender("fastapi", "FastAPI + XGBoost", "fastapi"),
    Contender("mlserver", "MLServer", "mlserver", output=mlserver.OUTPUT),
    Contender(
        "mlserver-batching", "MLServer batching", "mlserver", output=mlserver.OUTPUT, batching=True
    ),
    Contender("sluice-nobatch", "Sluice no batching", "sluice", binary=True),
    Contender("sluice", "Sluice", "sluice", batching=True, binary=True),
    Contender(
        "sluice-cache", "Sluice cache-warm", "sluice", batching=True, cache=True, binary=True
    ),
)
QUICK = ("floor", "sluice-nobatch", "sluice")


@dataclass(frozen=True, slots=True)
class Setup:
    """What every builder may need for this run."""

    repository: Path
    model: str
    version: int
    artifact: Path
    workdir: Path
    sluice_env: Mapping[str, str] = field(default_factory=dict)
    mlserver_env: mlserver.MLServerEnv | Unavailable | None = None
    mlserver_config: mlserver.MLServerConfig = field(default_factory=mlserver.MLServerConfig)


@dataclass(frozen=True, slots=True)
class Launch:
    command: ServerCommand
    config: dict[str, Any]


def _floor(contender: Contender, setup: Setup) -> Launch:
    return _uvicorn("loadtest.benchmarks.apps.floor", {"BENCH_OUTPUT": contender.output}, setup)


def _fastapi(contender: Contender, setup: Setup) -> Launch:
    if importlib.util.find_spec("fastapi") is None:
        raise Unavailable("fastapi is not installed (pip install -e '.[loadtest]')")
    env = {"BENCH_MODEL_FILE": str(setup.artifact.resolve())}
    return _uvicorn("loadtest.benchmarks.apps.fastapi_app", env, setup)


def _uvicorn(module: str, env: dict[str, str], setup: Setup) -> Launch:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", f"{module}:create_app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *UVICORN, "--log-level", "warning"]
    env = {"BENCH_MODEL": setup.model, **env}
    return Launch(ServerCommand(argv, port, env), {"argv": argv[1:], "env": env})


def _mlserver(contender: Contender, setup: Setup) -> Launch:
    env = setup.mlserver_env
    if env is None:
        raise Unavailable("MLServer was not prepared")
    if isinstance(env, Unavailable):
        raise env
    config = setup.mlserver_config
    if not contender.batching:
        config = mlserver.MLServerConfig(config.parallel_workers)
    workdir = setup.workdir / contender.key
    port, files = mlserver.write_settings(
        workdir, setup.model, str(setup.version), setup.artifact, config
    )
    recorded = {**asdict(config), **files, "packages": list(env.packages)}
    return Launch(mlserver.command(env, workdir, port), recorded)


def _sluice(contender: Contender, setup: Setup) -> Launch:
    port = free_port()
    argv = [sys.executable, "-m", "server", "serve", "--model-repository", str(setup.repository)]
    argv += ["--port", str(port), "--log-level", "warning"]
    if not contender.batching:
        argv.append("--no-batching")
    if contender.cache:
        repository = cached_repository(setup.repository, setup.model, setup.workdir / contender.key)
        argv[argv.index(str(setup.repository))] = str(repository)
    env = dict(setup.sluice_env)
    return Launch(ServerCommand(argv, port, env), {"argv": argv[1:], "env": env})


def cached_repository(source: Path, model: str, root: Path) -> Path:
    """A repository of ``model`` alone with its result cache on (model.yaml ``cache``).

    The version folders are symlinks to the originals; the model.yaml is a copy
    with ``cache: {enabled: true}``. Made anew each time.
    """
    target = root / "repository" / model
    if target.parent.exists():
        shutil.rmtree(target.parent)
    target.mkdir(parents=True)
    doc = yaml.safe_load((source / model / "model.yaml").read_text())
    doc["cache"] = {**(doc.get("cache") or {}), "enabled": True}
    (target / "model.yaml").write_text(yaml.safe_dump(doc))
    for version in (source / model).iterdir():
        if version.is_dir() and version.name.isdigit():
            (target / version.name).symlink_to(version.resolve(), target_is_directory=True)
    return target.parent


BUILDERS: dict[Kind, Callable[[Contender, Setup], Launch]] = {
    "floor": _floor,
    "fastapi": _fastapi,
    "mlserver": _mlserver,
    "sluice": _sluice,
}


def launch(contender: Contender, setup: Setup) -> Launch:
    """The command that starts ``contender``; ``Unavailable`` when it cannot run here."""
    return BUILDERS[contender.kind](contender, setup)


def select(
    keys: list[str] | None, quick: bool, with_cache: bool, binary: bool
) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run, and those declared but skipped with the reason."""
    wanted = set(keys) if keys else set(QUICK) if quick else {c.key for c in CONTENDERS}
    unknown = wanted - {c.key for c in CONTENDERS}
    if unknown:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; known: {keys_of(CONTENDERS)}")
    chosen, skipped = [], {}
    for contender in CONTENDERS:
        if contender.key not in wanted:
            continue
        if contender.cache and not with_cache:
            skipped[contender.key] = "the cache-warm contender runs with --with-cache"
        elif binary and not contender.binary:
            skipped[contender.key] = "does not speak the binary tensor extension"
        else:
            chosen.append(contender)
    return chosen, skipped


def keys_of(contenders: tuple[Contender, ...] | list[Contender]) -> str:
    return ", ".join(c.key for c in contenders)
