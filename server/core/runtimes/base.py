"""The Runtime protocol every model backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.core.signature import Signature


@dataclass(frozen=True, slots=True)
class ExecutorTiming:
    """One executor's median time for one call at one batch size, measured at load."""

    executor: str
    rows: int
    micros: float


@dataclass(frozen=True, slots=True)
class Executors:
    """What executes a loaded version, and how a batch picks one.

    ``names`` lists the executors in use: one for a plain runtime, two for the
    XGBoost hybrid (``("compiled", "xgboost")``). With two, a batch of fewer
    than ``switch_rows`` rows runs on the first, any other on the second.
    ``note`` says why a version asked to run on more executors runs on fewer
    (a failed parity check, a conversion the converter refused).
    """

    names: tuple[str, ...]
    mode: str = ""  # runtime_options.executor as resolved ("auto", "xgboost", "compiled")
    switch_rows: int | None = None
    parity: float | None = None  # the largest output difference measured at load
    tolerance: float | None = None
    note: str = ""
    timings: tuple[ExecutorTiming, ...] = ()
    # Batches of at most this many rows cost less than handing them to a thread (measured
    # at load), so a dispatcher may run them on the event loop; 0: never.
    inline_rows: int = 0

    def summary(self) -> str:
        """One line for a table or a metadata property: ``compiled 1-27, xgboost 28+`` (rows)."""
        if len(self.names) == 2 and self.switch_rows is not None:
            first, second = self.names
            return f"{first} 1-{self.switch_rows - 1}, {second} {self.switch_rows}+"
        return ", ".join(self.names)


class Runtime(Protocol):
    """A loaded model artifact that predicts synchronously.

    ``predict`` is CPU-bound and is only ever called from the inference thread
    pool, never on the event loop. Implementations must be safe to call from
    several threads at once.
    """

    platform: str
    executors: Executors

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; outputs keep the batch dimension first."""
        ...

    def close(self) -> None:
        """Release the artifact's resources."""
        ...


class RuntimeFactory(Protocol):
    """Loads an artifact, checks it against the declared signature, returns a Runtime."""

    def __call__(
        self,
        artifact: Path,
        signature: Signature,
        options: Mapping[str, Any],
        *,
        isolated: bool = False,
    ) -> Runtime:
        """``isolated``: the process is serving; keep pure-Python loading work (a tree
        conversion) out of it, so its event loop never waits for the GIL."""
        ...


class SignatureMismatch(Exception):
    """The artifact's own metadata disagrees with the model.yaml signature."""


class CompileError(Exception):
    """A booster could not be turned into compiled trees (the reason is the message)."""
