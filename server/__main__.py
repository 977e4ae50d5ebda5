"""The ``sluice`` command line: ``serve``, ``batch``, ``models list``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from server import __version__, governance_cli, traffic_cli
from server.batch import cli as batch_cli
from server.config import ConfigError, Settings, load_settings

EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--model-repository", type=Path, help="model repository root")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice inference server")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model repository over HTTP (V2)")
    _common(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--inference-threads", type=int, help="model thread pool size")
    serve.add_argument(
        "--workers",
        default="1",
        metavar="N|auto",
        help="server processes on the one port (auto: the CPUs this process may use)",
    )
    # Set by the --workers supervisor on each worker it starts (server/workers.py).
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dynamic batching (per-model settings still apply)",
    )
    serve.add_argument("--ssl-certfile", type=Path, help="PEM certificate chain: serve HTTPS")
    serve.add_argument("--ssl-keyfile", type=Path, help="PEM private key of the certificate")
    serve.add_argument(
        "--ssl-ca-certs", type=Path, help="CA bundle; clients must present a certificate it signed"
    )

    batch_cli.add_parser(commands)

    models = commands.add_parser("models", help="inspect the model repository")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="models, versions, readiness, digests")
    _common(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    governance_cli.add_parsers(models_commands, _common)
    traffic_cli.add_parser(models_commands, _common)
    return parser


def settings_from(args: argparse.Namespace, *names: str) -> Settings:
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in names}
    flags["model_repository"] = args.model_repository
    tls = {
        f"tls_{part}": getattr(args, f"ssl_{part}", None)
        for part in ("certfile", "keyfile", "ca_certs")
    }
    if any(value is not None for value in tls.values()):
        flags["security"] = {k: v for k, v in tls.items() if v is not None}
    return load_settings(args.config, flags=flags)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "batch":
        return batch_cli.run(args)
    try:
        if args.command == "serve":
            settings = settings_from(
                args, "host", "port", "log_level", "inference_threads", "batching"
            )
            if args.workers != "1" or args.worker_index is not None:
                return serve_workers(args, argv, settings)
            return serve(settings)
        settings = settings_from(args)
        if args.models_command in ("show", "history", "approve"):
            return governance_cli.run(args, settings)
        if args.models_command == "traffic":
            return traffic_cli.run(args, settings)
        return list_models(settings, as_json=args.json)
    except ConfigError as exc:
        print(f"sluice: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def serve_workers(args: argparse.Namespace, argv: list[str] | None, settings: Settings) -> int:
    """``--workers N``: a supervisor over N worker processes (``server/workers.py``)."""
    from server import workers

    if args.worker_index is not None:
        return workers.serve_worker(settings, args.worker_index)
    try:
        count = workers.resolve_workers(args.workers)
    except ValueError as exc:
        print(f"sluice: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if count == 1:
        return serve(settings)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not _repository_found(settings):
        return EXIT_USAGE
    _warn_exposure(settings)  # once, here: the workers do not repeat it
    forwarded = workers.without_workers_flag(sys.argv[1:] if argv is None else argv)
    return workers.supervise(forwarded, settings, count, args.inference_threads is not None)


def serve(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not _repository_found(settings):
        return EXIT_USAGE
    from server.http import serving

    _warn_exposure(settings)
    return serving.run(settings)


def _repository_found(settings: Settings) -> bool:
    if settings.model_repository.is_dir():
        return True
    print(
        f"sluice: error: model repository {settings.model_repository} is not a directory",
        file=sys.stderr,
    )
    return False


def _warn_exposure(settings: Settings) -> None:
    from server.http.serving import exposure_warnings

    for warning in exposure_warnings(settings):
        logging.getLogger("sluice.security").warning(warning)


def list_models(settings: Settings, as_json: bool) -> int:
    from server.models_cli import describe_repository, print_table

    if not settings.model_repository.is_dir():
        print(
            f"sluice: error: model repository {settings.model_repository} is not a directory",
            file=sys.stderr,
        )
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING)
    rows = asyncio.run(describe_repository(settings))
    if as_json:
        import orjson

        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        print_table(rows)
    return 0 if all(r["state"] == "READY" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
