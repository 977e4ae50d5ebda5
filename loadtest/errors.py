"""Failures of the load generator itself, each with the exit code the CLI maps it to."""

from __future__ import annotations


class LoadTestError(Exception):
    """Base of every error the harness raises on purpose."""

    exit_code = 1


class UsageError(LoadTestError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = 2


class RemoteTargetRefused(UsageError):
    """A target outside this machine without ``--allow-remote``."""


class TargetUnreachable(LoadTestError):
    """Nothing answered at the target's address."""

    exit_code = 3


class MetadataError(LoadTestError):
    """The target answered, but not with usable model metadata."""

    exit_code = 4


class DataError(LoadTestError):
    """A rows file or expected-outputs file that cannot feed this model."""

    exit_code = 5
