"""Sluice's load generator for Open Inference Protocol (KServe V2) HTTP servers.

Build a :class:`Target`, fetch its :class:`ModelMetadata`, pre-encode a
:class:`RequestPool`, then measure with :func:`run_closed` / :func:`run_open`
(or :func:`run_sweep`, :func:`run_compare`); every run returns a
:class:`RunResult`.
"""

from loadtest.bodies import (
    BodySpec,
    RequestPool,
    build_pool,
    pool_from_tensors,
    random_pool,
    rows_pool,
)
from loadtest.check import ExpectedOutputs, OutputChecker, load_expected
from loadtest.compare import Arm, CompareResult, run_compare
from loadtest.encoding import Tensor
from loadtest.errors import (
    DataError,
    LoadTestError,
    MetadataError,
    RemoteTargetRefused,
    TargetUnreachable,
    UsageError,
)
from loadtest.http import ErrorKind
from loadtest.openloop import Arrival
from loadtest.runner import ClosedLoad, Load, OpenLoad, run_closed, run_load, run_open
from loadtest.stats import LatencySummary, RunResult
from loadtest.sweep import SweepPlan, SweepResult, SweepStep, run_sweep
from loadtest.target import ModelMetadata, Target, TensorMeta, fetch_metadata

__all__ = [
    "Arm",
    "Arrival",
    "BodySpec",
    "ClosedLoad",
    "CompareResult",
    "DataError",
    "ErrorKind",
    "ExpectedOutputs",
    "LatencySummary",
    "Load",
    "LoadTestError",
    "MetadataError",
    "ModelMetadata",
    "OpenLoad",
    "OutputChecker",
    "RemoteTargetRefused",
    "RequestPool",
    "RunResult",
    "SweepPlan",
    "SweepResult",
    "SweepStep",
    "Target",
    "TargetUnreachable",
    "Tensor",
    "TensorMeta",
    "UsageError",
    "build_pool",
    "fetch_metadata",
    "load_expected",
    "pool_from_tensors",
    "random_pool",
    "rows_pool",
    "run_closed",
    "run_compare",
    "run_load",
    "run_open",
    "run_sweep",
]
