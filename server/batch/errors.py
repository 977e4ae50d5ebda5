"""Errors of the batch edge; the CLI maps each to its exit code once."""

from __future__ import annotations


class BatchError(Exception):
    """A batch job cannot run or stopped; the message is one line for the user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BatchUsageError(BatchError):
    """The command, the input's columns or a resume request do not fit: nothing was scored."""

    exit_code = 2


class BadRowError(BatchError):
    """A row could not be scored and ``--on-error fail`` was chosen."""

    exit_code = 2
