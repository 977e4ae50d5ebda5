"""``--drift-report``: the drift of one whole scored file against the version's reference.

The statistics are the live ``DriftMonitor``'s; what is batch-only is the
window (every row of the file in one unbounded window) and the report being a
file written once, when the run ends.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from server.config import DriftSettings
from server.core.monitoring.drift import DriftMonitor, Status, worst
from server.core.monitoring.reference import load_reference
from server.core.monitoring.window import WindowSpec
from server.core.registry import ModelVersion


class FileDriftReport:
    """Drift of a whole scored file: a batch ``ChunkObserver`` (observe, then finish)."""

    def __init__(self, path: Path, monitor: DriftMonitor, model: str, version: int) -> None:
        self.path = path
        self.monitor = monitor
        self.model = model
        self.version = version

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        self.monitor.update(inputs, outputs, 0.0)

    def report(self) -> dict[str, Any]:
        doc = self.monitor.report(0.0)
        status = worst(
            Status(doc[key]["status"])
            for key in ("data_drift", "prediction_drift")
            if doc[key]["columns"]
        )
        return {"model": self.model, "version": str(self.version), "status": status.value, **doc}

    def finish(self) -> dict[str, Any]:
        """Write the report (atomically) and return its headline for the run summary."""
        doc = self.report()
        _write_atomic(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return {
            "path": str(self.path),
            "status": doc["status"],
            "rows": doc["window"]["rows"],
            "drifted_features": doc["data_drift"]["drifted"],
            "drifted_outputs": doc["prediction_drift"]["drifted"],
        }


def file_drift_report(
    path: Path, version: ModelVersion, settings: DriftSettings | None = None
) -> FileDriftReport:
    """A report of a scored file against ``reference.json`` of ``version``.

    Every row lands in one unbounded window (the counts stay fixed-size).
    Raises ``ProfileError`` when the version has no readable reference.json.
    """
    if version.source is None:
        raise FileNotFoundError(f"model '{version.name}' version {version.version} has no files")
    reference = load_reference(version.source.reference_path)
    monitor = DriftMonitor(
        reference,
        version.signature,
        settings or DriftSettings(),
        WindowSpec(rows=2**62, seconds=math.inf, count=1),
    )
    return FileDriftReport(path, monitor, version.name, version.version)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
