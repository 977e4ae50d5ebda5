"""The serving error hierarchy.

The core raises these; each edge maps them once (HTTP status in ``server/http``,
exit codes in the CLI). Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable


class ServingError(Exception):
    """Base class of every error a client of the core can be shown."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    """The request does not match the model's signature or is malformed."""

    exit_code = 2


class ModelNotFound(ServingError):
    """No such model, or no such version of it.

    Worded once, here, in the form tritonclient and KServe clients look for.
    """

    exit_code = 3

    @classmethod
    def model(cls, name: str) -> ModelNotFound:
        return cls(f"Request for unknown model: '{name}' is not found")

    @classmethod
    def version(cls, name: str, version: int, served: Iterable[int] = ()) -> ModelNotFound:
        listed = ", ".join(str(v) for v in sorted(served)) or "none"
        return cls(
            f"Request for unknown model: '{name}' version {version} is not found "
            f"(served versions: {listed})"
        )


class ModelNotReady(ServingError):
    """The model (version) exists but cannot serve: failed to load or is unloading."""

    exit_code = 4

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ServingError):
    """A bounded queue is full; the caller should retry later."""

    exit_code = 5

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServingError):
    """The request waited longer than its deadline before compute started."""

    exit_code = 6


class RuntimeFailure(ServingError):
    """The model runtime raised while computing; not the client's fault."""

    exit_code = 7


class Unsupported(ServingError):
    """A protocol feature the server does not implement."""

    exit_code = 8
