"""Progress while scoring: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

log = logging.getLogger("sluice.batch")


class Progress(Protocol):
    def update(self, rows: int, fraction: float | None) -> None:
        """``rows`` read so far; ``fraction`` of the input consumed, when known."""
        ...

    def close(self) -> None: ...


class _Rate:
    """Rows per second since the first update, so model loading does not count."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None

    def __call__(self, rows: int) -> tuple[float, float]:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, rows)
        started, base = self._first
        elapsed = now - started
        return elapsed, ((rows - base) / elapsed if elapsed > 0 else 0.0)


class NoProgress:
    def update(self, rows: int, fraction: float | None) -> None:
        pass

    def close(self) -> None:
        pass


class LogProgress:
    """One line every ``every_s`` seconds: rows, rows/s and the estimated time left."""

    def __init__(self, every_s: float = 10.0) -> None:
        self._every = every_s
        self._rate = _Rate()
        self._last = time.monotonic()

    def update(self, rows: int, fraction: float | None) -> None:
        elapsed, rate = self._rate(rows)
        now = time.monotonic()
        if now - self._last < self._every:
            return
        self._last = now
        done = f" ({fraction:.0%})" if fraction is not None else ""
        eta = ""
        if fraction and 0 < fraction < 1 and elapsed > 0:
            eta = f", ETA {elapsed * (1 - fraction) / fraction:.0f} s"
        log.info("read %s rows%s, %s rows/s%s", f"{rows:,}", done, f"{rate:,.0f}", eta)

    def close(self) -> None:
        pass


class BarProgress:
    """A rich progress bar on stderr."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._rate = _Rate()
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]} rows  {task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(description, total=1.0, rows="0", rate="0")
        self._started_bar = False

    def update(self, rows: int, fraction: float | None) -> None:
        if not self._started_bar:  # not before the run is checked and scoring
            self._bar.start()
            self._started_bar = True
        _, rate = self._rate(rows)
        self._bar.update(
            self._task,
            completed=fraction if fraction is not None else 0.0,
            total=1.0 if fraction is not None else None,
            rows=f"{rows:,}",
            rate=f"{rate:,.0f}",
        )

    def close(self) -> None:
        if self._started_bar:
            self._bar.stop()


def make_progress(description: str, enabled: bool | None) -> Progress:
    """A bar when stderr is a terminal (or ``enabled``), else log lines."""
    if enabled is False:
        return NoProgress()
    if enabled or sys.stderr.isatty():
        return BarProgress(description)
    return LogProgress()
