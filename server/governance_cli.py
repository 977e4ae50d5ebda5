"""``sluice models show | history | approve``: cards, approvals and the audit trail.

- ``show NAME[:VERSION]`` loads the repository (as ``models list`` does) and
  prints each version's card, artifact sha256, approval and the traffic.
- ``history NAME`` reads the audit log (and, with ``--request-id``, the
  prediction log) from the state files: it needs no running server and
  answers "which version scored request X at time T, and who approved it?".
- ``approve NAME:VERSION`` appends to the state files directly (the artifact
  is hashed from the repository), or with ``--url`` asks a running server
  (``POST /v2/models/{name}/versions/{version}/approve``; ``--api-key`` or
  ``SLUICE_API_KEY`` for a server with keys). Either way the approval is
  bound to the artifact's sha256 and recorded in the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from server.config import Settings
from server.errors import ServingError

if TYPE_CHECKING:
    from server.core.governance.approvals import Approval, ApprovalStore
    from server.core.governance.audit import AuditRecord

EXIT_FAILED = 1


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    show = commands.add_parser("show", help="a model's cards, digests, approvals and traffic")
    common(show)
    show.add_argument("target", metavar="NAME[:VERSION]")
    show.add_argument("--json", action="store_true", help="print JSON")

    history = commands.add_parser(
        "history", help="the audit trail of a model; --request-id: who scored it, who approved"
    )
    common(history)
    history.add_argument("name", metavar="NAME")
    history.add_argument("--request-id", help="the request to explain (needs the prediction log)")
    history.add_argument("--since", help="ISO 8601 time (UTC unless it says) or epoch seconds")
    history.add_argument("--until", help="ISO 8601 time (UTC unless it says) or epoch seconds")
    history.add_argument("--json", action="store_true", help="print JSON Lines")

    approve = commands.add_parser("approve", help="approve a version (audited)")
    common(approve)
    approve.add_argument("target", metavar="NAME:VERSION")
    approve.add_argument("--actor", required=True, help="who approves")
    approve.add_argument("--reason", required=True, help="why (ticket, validation report)")
    approve.add_argument("--url", help="a running server (else: write the state files)")
    approve.add_argument("--api-key", help="API key for --url (else SLUICE_API_KEY)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``models show|history|approve``; the exit code."""
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.models_command == "show":
            return show(settings, args.target, args.json)
        if args.models_command == "history":
            return history(settings, args)
        return approve(settings, args)
    except (ServingError, ValueError) as exc:
        print(f"sluice: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _target(text: str, need_version: bool) -> tuple[str, int | None]:
    name, _, version = text.partition(":")
    if not name or (version and not version.isdigit()) or (need_version and not version):
        raise ValueError(
            f"expected NAME{':VERSION' if need_version else '[:VERSION]'}, got {text!r}"
        )
    return name, int(version) if version else None


# -- show ---------------------------------------------------------------------


def show(settings: Settings, target: str, as_json: bool) -> int:
    name, version = _target(target, need_version=False)
    doc = asyncio.run(_describe(settings, name, version))
    if as_json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode())
        return 0
    print(f"model {doc['model']}: {doc['description']}")
    print(f"traffic: {doc['traffic']}")
    for v in doc["versions"]:
        print(f"\nversion {v['version']}  {v['state']}{'  ' + v['reason'] if v['reason'] else ''}")
        print(f"  artifact sha256  {v['sha256']}")
        card = v["card"]
        if not card["matches_artifact"]:
            print(f"  WARNING: the card was written for artifact {card['card_sha256']}")
        print(f"  trained_at       {card['trained_at'] or '-'}")
        print(f"  code_revision    {card['code_revision'] or '-'}")
        data = card["data"]
        print(f"  data sha256      {data.get('sha256', '-')}")
        if data.get("holdout_sha256"):
            print(f"  holdout sha256   {data['holdout_sha256']}")
        for key, value in _flat(card["metrics"]):
            print(f"  metric {key:<10}{value}")
        print(f"  approval         {_approval_text(v['approval'])}")
    return 0


async def _describe(settings: Settings, name: str, version: int | None) -> dict[str, Any]:
    from server.core.stack import open_dataplane

    async with open_dataplane(settings) as plane:
        info = plane.model(name, version)
        try:
            view = plane.traffic(name)
            traffic = orjson.loads(orjson.dumps(view.document.model_dump(mode="json")))
            traffic = {"state": view.state.value, "reason": view.reason, **traffic}
        except ServingError:
            chosen = info.chosen.version if info.chosen else None
            traffic = {"primary": chosen, "note": "primary: highest ready version"}
        versions = []
        for v in info.versions:
            if version is not None and v.version != version:
                continue
            card = plane.card(name, v.version)
            approval = plane.approval(name, v.version)
            versions.append(
                {
                    "version": v.version,
                    "state": v.state.value,
                    "reason": v.reason,
                    "sha256": v.sha256,
                    "card": {
                        "description": card.description,
                        "trained_at": card.trained_at,
                        "code_revision": card.code_revision,
                        "data": dict(card.data),
                        "metrics": dict(card.metrics),
                        "card_sha256": card.card_sha256,
                        "matches_artifact": card.matches_artifact,
                    },
                    "approval": approval.to_dict() if approval else None,
                }
            )
        return {
            "model": info.name,
            "description": info.description,
            "traffic": traffic,
            "versions": versions,
        }


def _flat(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _approval_text(approval: dict[str, Any] | None) -> str:
    if approval is None:
        return "not approved"
    when = f" at {approval['time']}" if approval.get("time") else ""
    return f"approved by {approval['actor']}{when} ({approval['source']}: {approval['reason']})"


# -- history ------------------------------------------------------------------


def history(settings: Settings, args: argparse.Namespace) -> int:
    from server.core.governance.approvals import ApprovalStore
    from server.core.governance.audit import parse_time, read_audit, select
    from server.core.governance.predictions import find_predictions

    config = settings.governance
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    audit_path = config.audit_path(settings.model_repository)
    records = select(read_audit(audit_path), args.name, since, until)
    if args.request_id is None:
        for record in records:
            print(_json(record.to_dict()) if args.json else _audit_line(record))
        if not records:
            print(f"no audit records for '{args.name}' in {audit_path}", file=sys.stderr)
        return 0
    if config.prediction_log is None:
        print(
            "sluice: error: the prediction log is off (governance.prediction_log): "
            "requests cannot be traced",
            file=sys.stderr,
        )
        return EXIT_FAILED
    found = [
        p
        for p in find_predictions(config.prediction_log, args.request_id, args.name)
        if (since is None or p["ts"] >= since) and (until is None or p["ts"] <= until)
    ]
    if not found:
        print(
            f"sluice: error: no prediction of '{args.name}' with request id "
            f"{args.request_id!r} in {config.prediction_log}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    trail = select(read_audit(audit_path), args.name)
    store = ApprovalStore(config.state_path(settings.model_repository))
    for prediction in found:
        answer = explain(settings, prediction, trail, store)
        print(_json(answer) if args.json else _explanation(answer))
    return 0


def explain(
    settings: Settings,
    prediction: dict[str, Any],
    trail: list[AuditRecord],
    store: ApprovalStore,
) -> dict[str, Any]:
    """Which version scored one request, why that one, who approved it, since when it served."""
    from server.core.governance.approvals import card_approval

    model, version, ts = prediction["model"], int(prediction["version"]), float(prediction["ts"])
    sha256 = str(prediction.get("sha256", ""))
    approval: Approval | None = store.get(model, version, sha256, at=ts)
    if approval is None:
        approval = card_approval(model, version, _card(settings.model_repository, model, version))
    before = [r for r in trail if r.ts <= ts]
    loads = [
        r
        for r in before
        if r.action == "load" and r.version == version and r.figures.get("state") == "READY"
    ]
    traffic = [r for r in before if r.action in ("traffic", "step", "promote", "rollback")]
    return {
        "request_id": prediction["request_id"],
        "time": prediction["time"],
        "model": model,
        "version": version,
        "why": prediction.get("reason", ""),
        "status": prediction.get("status", ""),
        "error": prediction.get("error", ""),
        "sha256": sha256,
        "approval": approval.to_dict() if approval else None,
        "loaded": loads[-1].to_dict() if loads else None,
        "last_traffic_change": traffic[-1].to_dict() if traffic else None,
    }


def _card(repository: Path, model: str, version: int) -> dict[str, Any]:
    import yaml

    path = repository / model / str(version) / "card.yaml"
    try:
        card = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return card if isinstance(card, dict) else {}


def _explanation(answer: dict[str, Any]) -> str:
    lines = [
        f"request {answer['request_id']} ({answer['model']}) at {answer['time']}: "
        f"scored by version {answer['version']} (chosen: {answer['why']}), "
        f"status {answer['status']}{' ' + answer['error'] if answer['error'] else ''}",
        f"  artifact sha256  {answer['sha256']}",
        f"  approval         {_approval_text(answer['approval'])}",
    ]
    loaded = answer["loaded"]
    if loaded is not None:
        lines.append(
            f"  serving since    {loaded['time']} ({loaded['reason']}, by {loaded['actor']})"
        )
    change = answer["last_traffic_change"]
    if change is not None:
        lines.append(
            f"  last traffic     {change['time']} {change['action']} by {change['actor']}: "
            f"{change['reason']}"
        )
    return "\n".join(lines)


def _audit_line(record: AuditRecord) -> str:
    version = f"v{record.version}" if record.version is not None else "-"
    figures = _json(dict(record.figures)) if record.figures else ""
    return (
        f"{record.time}  {record.action:<8} {record.model} {version:<4} by {record.actor}: "
        f"{record.reason}  {figures}"
    ).rstrip()


def _json(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc, default=str).decode()


# -- approve ------------------------------------------------------------------


def approve(settings: Settings, args: argparse.Namespace) -> int:
    name, version = _target(args.target, need_version=True)
    assert version is not None
    if args.url:
        return _approve_remote(args, name, version)
    from server.core.governance import Governance
    from server.core.repository import ModelRepository

    repository = ModelRepository(settings.model_repository)
    source = repository.read_version(name, version, repository.read_config(name))
    governance = Governance.from_settings(settings, writers=True)
    try:
        approval = governance.approve(name, version, source.sha256, args.actor, args.reason)
    finally:
        governance.close()
    print(f"{name} version {version}: {_approval_text(approval.to_dict())}")
    return 0


def _approve_remote(args: argparse.Namespace, name: str, version: int) -> int:
    import httpx

    key = args.api_key or os.environ.get("SLUICE_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = f"{args.url.rstrip('/')}/v2/models/{name}/versions/{version}/approve"
    answer = httpx.post(
        url, json={"actor": args.actor, "reason": args.reason}, headers=headers, timeout=30
    )
    if answer.status_code != 200:
        print(f"sluice: error: {answer.status_code} {answer.text}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{name} version {version}: {_approval_text(answer.json())}")
    return 0
