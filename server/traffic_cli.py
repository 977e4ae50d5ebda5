"""``sluice models traffic NAME [ACTION]``: read or steer a running server's traffic.

    sluice models traffic fraud                          # the document, state and figures
    sluice models traffic fraud set traffic.json         # replace the document (PUT)
    sluice models traffic fraud canary 2 --weight 5      # the primary stays, v2 at 5 %
    sluice models traffic fraud promote|rollback|pause|resume --reason "..."

Talks to ``--url`` (default the configured host and port) over the same
``/v2/models/{name}/traffic`` routes any client can use.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from server.config import Settings

ACTIONS = ("show", "set", "canary", "promote", "rollback", "pause", "resume")


def add_parser(commands: Any, common: Any) -> None:
    traffic = commands.add_parser("traffic", help="read or steer a running server's traffic")
    common(traffic)
    traffic.add_argument("model")
    traffic.add_argument("action", nargs="?", default="show", choices=ACTIONS)
    traffic.add_argument("value", nargs="?", help="set: a JSON file; canary: its version")
    traffic.add_argument("--weight", type=float, default=5.0, help="canary: percent (default 5)")
    traffic.add_argument("--auto", action="store_true", help="canary: let the analysis move it")
    traffic.add_argument("--reason", default="", help="recorded with the change")
    traffic.add_argument("--actor", default=os.environ.get("USER", "cli"), help="who changes it")
    traffic.add_argument("--url", help="the server (default: http://HOST:PORT from settings)")
    traffic.add_argument("--api-key", help="an admin key (else SLUICE_API_KEY)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    base = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    path = f"{base}/v2/models/{args.model}/traffic"
    key = args.api_key or os.environ.get("SLUICE_API_KEY")
    headers = {"x-actor": args.actor, "x-reason": args.reason}
    if key:
        headers["authorization"] = f"Bearer {key}"
    try:
        if args.action == "show":
            answer = httpx.get(path, headers=headers, timeout=30)
        elif args.action in ("set", "canary"):
            document = _document(args, httpx.get(path, headers=headers, timeout=30))
            answer = httpx.put(path, content=orjson.dumps(document), headers=headers, timeout=30)
        else:
            body = {"actor": args.actor, "reason": args.reason}
            answer = httpx.post(f"{path}/{args.action}", json=body, headers=headers, timeout=30)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        print(f"sluice: error: {exc}", file=sys.stderr)
        return 1
    if answer.status_code != 200:
        print(f"sluice: error: {answer.status_code} {answer.text}", file=sys.stderr)
        return 1
    print(orjson.dumps(answer.json(), option=orjson.OPT_INDENT_2).decode())
    return 0


_KEYS = ("primary", "canary", "shadows", "routing_key_header", "analysis")


def _document(args: argparse.Namespace, current: Any) -> dict[str, Any]:
    if args.action == "set":
        if not args.value:
            raise ValueError("set needs a JSON file with the traffic document")
        doc = orjson.loads(Path(args.value).read_bytes())
        if not isinstance(doc, dict):
            raise ValueError(f"{args.value}: the traffic document must be a JSON object")
        return doc
    if not args.value:
        raise ValueError("canary needs the canary's version")
    if current.status_code != 200:
        raise ValueError(f"{current.status_code} {current.text}")
    doc = {k: v for k, v in current.json().items() if k in _KEYS}
    if doc.get("primary") is None:
        versions = [v for v in current.json()["versions"] if v["role"] == "primary"]
        doc["primary"] = str(versions[0]["version"]) if versions else None
    doc["canary"] = {"version": args.value, "weight": args.weight}
    doc["analysis"] = {**doc.get("analysis", {}), "auto": bool(args.auto)}
    return doc
