"""The resume manifest: what a run had made durable when it stopped.

It is replaced atomically after every completed chunk, so after a crash it
describes exactly the output and quarantine bytes that may be kept.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from server.batch.errors import BatchUsageError
from server.batch.readers import Position

MANIFEST_VERSION = 1
_SAMPLE = 1 << 20


def input_fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time and a hash of the first and last MiB."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_SAMPLE))
        if stat.st_size > 2 * _SAMPLE:
            handle.seek(-_SAMPLE, os.SEEK_END)
            digest.update(handle.read(_SAMPLE))
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_head_tail": digest.hexdigest(),
    }


def job_fingerprint(fields: dict[str, Any]) -> str:
    """A digest of every option that changes the output; a resume must match it."""
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(slots=True)
class Counts:
    """Rows read = scored + skipped + quarantined, always."""

    read: int = 0
    scored: int = 0
    skipped: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Manifest:
    job: dict[str, Any]
    fingerprint: str
    input: dict[str, Any]
    chunks: int = 0
    position: Position = field(default_factory=Position)
    counts: Counts = field(default_factory=Counts)
    output_state: int = 0
    quarantine_bytes: int = 0
    elapsed_s: float = 0.0

    def save(self, path: Path) -> None:
        doc = {"version": MANIFEST_VERSION, **asdict(self)}
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as handle:
            handle.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            doc = orjson.loads(path.read_bytes())
            if doc.pop("version") != MANIFEST_VERSION:
                raise ValueError("unknown manifest version")
            doc["position"] = Position(**doc["position"])
            doc["counts"] = Counts(**doc["counts"])
            return cls(**doc)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BatchUsageError(
                f"cannot resume: manifest {path} is unreadable ({exc}); run without --resume"
            ) from exc

    def check_resumable(self, job: dict[str, Any], source: dict[str, Any], path: Path) -> None:
        """Refuse to continue with another input file or other options."""
        if source != self.input:
            changed = [
                k
                for k in ("path", "size", "mtime_ns", "sha256_head_tail")
                if source.get(k) != self.input.get(k)
            ]
            raise BatchUsageError(
                f"cannot resume: the input file changed since the run that wrote {path} "
                f"({', '.join(changed)} differ); run without --resume to start over"
            )
        if job_fingerprint(job) != self.fingerprint:
            changed = sorted(k for k in {*job, *self.job} if job.get(k) != self.job.get(k))
            raise BatchUsageError(
                f"cannot resume: the model, version or options differ from the run that wrote "
                f"{path}; run without --resume to start over{_differences(self.job, changed)}"
            )


def _differences(before: dict[str, Any], changed: list[str]) -> str:
    if not changed:
        return ""
    return f" (was: {', '.join(f'{k}={before.get(k)}' for k in changed)})"
