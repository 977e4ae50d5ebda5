"""``sluice models list``: load the repository once and describe every version."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from server.config import Settings
from server.core.stack import open_service


async def describe_repository(settings: Settings) -> list[dict[str, Any]]:
    """One row per selected version (or per model that could not be read)."""
    rows: list[dict[str, Any]] = []
    async with open_service(settings) as service:
        for name, entry in sorted(service.registry.models.items()):
            if not entry.versions:
                rows.append(
                    {
                        "model": name,
                        "version": "",
                        "runtime": "",
                        "state": "UNAVAILABLE",
                        "sha256": "",
                        "reason": entry.error,
                    }
                )
            for version, mv in sorted(entry.versions.items()):
                rows.append(
                    {
                        "model": name,
                        "version": str(version),
                        "runtime": mv.source.runtime.value if mv.source else "",
                        "state": mv.state.value,
                        "sha256": mv.sha256,
                        "reason": mv.reason,
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Model repository")
    for column in ("model", "version", "runtime", "state", "sha256", "reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "green" if row["state"] == "READY" else "red"
        table.add_row(
            row["model"],
            row["version"],
            row["runtime"],
            f"[{style}]{row['state']}[/]",
            row["sha256"][:16],
            row["reason"],
        )
    Console().print(table)
