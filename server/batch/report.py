"""Per-chunk observers of offline scoring: the seam for file-level reports such as drift.

Per-request observers are the core's: ``InferenceService`` calls every
observer ``open_dataplane`` installed for each chunk, exactly as for an HTTP
request. A ``ChunkObserver`` is for what only a file run has: a report about
the whole scored file (``--drift-report PATH``), written when the run ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.batch.errors import BatchUsageError
from server.config import Settings
from server.core.registry import ModelVersion


class ChunkObserver(Protocol):
    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Called once per scored chunk, in input order, with the rows that were scored."""
        ...

    def finish(self) -> dict[str, Any]:
        """Write the report; returns what the run summary shows about it."""
        ...


def drift_report(path: Path, version: ModelVersion, settings: Settings) -> ChunkObserver:
    """Drift of the scored file against ``reference.json`` of this version."""
    try:
        from server.batch.drift_file import file_drift_report
        from server.core.monitoring.reference import ProfileError
    except ImportError:
        raise BatchUsageError(
            f"--drift-report {path}: drift monitoring is not part of this build"
        ) from None
    try:
        return file_drift_report(path, version, getattr(settings, "drift", None))
    except (ProfileError, OSError) as exc:
        raise BatchUsageError(
            f"--drift-report: model '{version.name}' version {version.version} has no usable "
            f"reference profile: {exc}"
        ) from exc
