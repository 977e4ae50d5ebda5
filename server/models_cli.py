"""``sluice models list``: load the repository once and describe every version."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from server.config import Settings
from server.core.runtimes.base import Executors
from server.core.stack import open_dataplane


def executor_fields(executors: Executors | None) -> dict[str, Any]:
    """The executors of a version as table / JSON fields (empty when it did not load)."""
    if executors is None:
        return {"executors": "", "executor_detail": {}}
    detail: dict[str, Any] = {
        "names": list(executors.names),
        "mode": executors.mode,
        "switch_rows": executors.switch_rows,
        "inline_rows": executors.inline_rows,
        "parity": executors.parity,
        "parity_tolerance": executors.tolerance,
        "note": executors.note,
        "timings_us": [
            {"executor": t.executor, "rows": t.rows, "us": round(t.micros, 1)}
            for t in executors.timings
        ],
    }
    return {"executors": executors.summary(), "executor_detail": detail}


async def describe_repository(settings: Settings) -> list[dict[str, Any]]:
    """One row per selected version (or per model that could not be read)."""
    rows: list[dict[str, Any]] = []
    async with open_dataplane(settings) as plane:
        for info in sorted(plane.models(), key=lambda m: m.name):
            if not info.versions:
                rows.append(
                    {
                        "model": info.name,
                        "version": "",
                        "runtime": "",
                        "state": "UNAVAILABLE",
                        "sha256": "",
                        "reason": info.error,
                        **executor_fields(None),
                    }
                )
            rows += [
                {
                    "model": info.name,
                    "version": str(v.version),
                    "runtime": v.runtime,
                    "state": v.state.value,
                    "sha256": v.sha256,
                    "reason": v.reason,
                    **executor_fields(v.executors),
                }
                for v in info.versions
            ]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Model repository")
    for column in ("model", "version", "runtime", "executors", "state", "sha256", "reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "green" if row["state"] == "READY" else "red"
        table.add_row(
            row["model"],
            row["version"],
            row["runtime"],
            row["executors"],
            f"[{style}]{row['state']}[/]",
            row["sha256"][:16],
            row["reason"] or row["executor_detail"].get("note", ""),
        )
    Console().print(table)
