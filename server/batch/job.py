"""What one ``sluice batch`` run was asked to do, validated once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from server.batch.errors import BatchUsageError
from server.config import Settings


class Format(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    JSONL = "jsonl"


EXTENSIONS: dict[str, Format] = {
    ".csv": Format.CSV,
    ".parquet": Format.PARQUET,
    ".pq": Format.PARQUET,
    ".jsonl": Format.JSONL,
    ".ndjson": Format.JSONL,
}


class OnError(StrEnum):
    """What happens to a row that cannot be scored."""

    FAIL = "fail"
    SKIP = "skip"
    QUARANTINE = "quarantine"


class Engine(StrEnum):
    LOCAL = "local"
    RAY = "ray"


def detect_format(path: Path, explicit: str | None, what: str) -> Format:
    """The format named by ``--format``/``--output-format``, else by the file extension."""
    if explicit:
        return Format(explicit)
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        known = ", ".join(sorted(EXTENSIONS))
        raise BatchUsageError(
            f"cannot tell the format of {what} {path} from its extension "
            f"(known: {known}); pass --{'format' if what == 'input' else 'output-format'}"
        )
    return found


@dataclass(frozen=True, slots=True)
class KeepColumns:
    """Input columns copied to the output: none, a list, or all of them."""

    names: tuple[str, ...] = ()
    all: bool = False

    @classmethod
    def parse(cls, raw: str | None) -> KeepColumns:
        if raw is None or not raw.strip():
            return cls()
        if raw.strip() == "all":
            return cls(all=True)
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        if len(set(names)) != len(names):
            raise BatchUsageError(f"--keep-columns lists a column twice: {raw}")
        return cls(names=names)

    def describe(self) -> str:
        return "all" if self.all else ",".join(self.names)


@dataclass(frozen=True, slots=True)
class BatchJob:
    """One scoring run: where from, where to, with which model and how strictly."""

    settings: Settings
    model: str
    version: int | None
    input: Path
    output: Path
    input_format: Format
    output_format: Format
    keep: KeepColumns = KeepColumns()
    on_error: OnError = OnError.FAIL
    quarantine: Path | None = None
    chunk_rows: int = 65_536
    resume: bool = False
    summary: Path | None = None
    drift_report: Path | None = None
    engine: Engine = Engine.LOCAL
    ray_address: str | None = None
    ray_actors: int | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal

    @property
    def quarantine_path(self) -> Path | None:
        """Where bad rows go (JSON Lines), only with ``--on-error quarantine``."""
        if self.on_error is not OnError.QUARANTINE:
            return None
        return self.quarantine or self.output.with_name(self.output.name + ".quarantine.jsonl")


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION``."""
    name, sep, version = ref.partition(":")
    if not name:
        raise BatchUsageError(f"--model must be NAME or NAME:VERSION, got '{ref}'")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise BatchUsageError(f"--model version must be a positive integer, got '{ref}'")
    return name, int(version)
