"""Write a benchmark's Markdown between its markers in README.md, and nothing else."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import textwrap
import time
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


class MarkerError(Exception):
    """The README lacks the section's markers, or has them out of order."""


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with everything between ``section``'s start and end markers set to ``body``."""
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    head, found, rest = text.partition(start)
    if not found:
        raise MarkerError(f"README has no '{start}' marker")
    _, found, tail = rest.partition(end)
    if not found:
        raise MarkerError(f"README has no '{end}' after '{start}'")
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def write_section(section: str, body: str, readme: Path = README) -> None:
    """Replace the section in place (atomically: a temporary file, then a rename)."""
    updated = replace_section(readme.read_text(), section, body)
    temporary = readme.with_name(f".{readme.name}.tmp")
    temporary.write_text(updated)
    os.replace(temporary, readme)


def machine() -> str:
    """CPU model and count, for the line under a table."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs"


def provenance(argv: list[str] | None = None) -> str:
    """How the figures were produced: the command, the date, the machine."""
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    module = sys.modules["__main__"].__spec__
    name = module.name if module else Path(sys.argv[0]).name
    when = time.strftime("%Y-%m-%d")
    invocation = f"python -m {name} {command}".rstrip()
    return f"`{invocation}` on {when}, {machine()}."


def with_notes(table: list[str], prose: str, argv: list[str] | None) -> str:
    """A README section: the table's lines, the prose under it and the command that made it."""
    wrap = textwrap.fill
    return "\n".join(
        [
            *table,
            "",
            wrap(prose, width=80, break_long_words=False),
            "",
            wrap(provenance(argv), width=80, break_long_words=False),
        ]
    )
