"""The Runtime protocol every model backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.core.signature import Signature


class Runtime(Protocol):
    """A loaded model artifact that predicts synchronously.

    ``predict`` is CPU-bound and is only ever called from the inference thread
    pool, never on the event loop. Implementations must be safe to call from
    several threads at once.
    """

    platform: str

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; outputs keep the batch dimension first."""
        ...

    def close(self) -> None:
        """Release the artifact's resources."""
        ...


class RuntimeFactory(Protocol):
    """Loads an artifact, checks it against the declared signature, returns a Runtime."""

    def __call__(
        self, artifact: Path, signature: Signature, options: Mapping[str, Any]
    ) -> Runtime: ...


class SignatureMismatch(Exception):
    """The artifact's own metadata disagrees with the model.yaml signature."""
