"""The end-of-run summary: counts that add up, printed as a line and written as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from server.batch.manifest import Counts


@dataclass(slots=True)
class BatchSummary:
    model: str
    version: int
    engine: str
    input: str
    output: str
    input_format: str
    output_format: str
    on_error: str
    counts: Counts
    seconds: float
    chunks: int = 0
    resumed: bool = False
    quarantine: str | None = None
    reports: dict[str, Any] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    # Unix time when the first scored rows were written (local engine; None: no rows).
    first_rows_at: float | None = None

    @property
    def rows_per_second(self) -> float:
        return self.counts.read / self.seconds if self.seconds > 0 else 0.0

    def finish(self) -> BatchSummary:
        """Record the process's peak memory, for the record and the benchmark."""
        self.peak_rss_mib = peak_rss_mib()
        return self

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["rows"] = doc.pop("counts")
        doc["rows_per_second"] = round(self.rows_per_second, 1)
        doc["seconds"] = round(self.seconds, 3)
        return doc

    def line(self) -> str:
        c = self.counts
        text = (
            f"{self.model} v{self.version}: read {c.read:,} rows, scored {c.scored:,}, "
            f"skipped {c.skipped:,}, quarantined {c.quarantined:,} in {self.seconds:.1f} s "
            f"({self.rows_per_second:,.0f} rows/s) -> {self.output}"
        )
        if self.quarantine and c.quarantined:
            text += f"; bad rows in {self.quarantine}"
        return text

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n"

    def write(self, path: Path) -> None:
        path.write_text(self.to_json())


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process since it started (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
