"""InferenceService: the one path every prediction takes, online or offline."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from server.core.registry import ModelVersion
from server.core.routing import Reason, Route
from server.core.signature import TensorSpec, validate_inputs
from server.errors import InvalidInput, ModelNotReady, ServingError

log = logging.getLogger("sluice.service")


@dataclass(slots=True)
class InferenceRequest:
    """A decoded request, free of any wire format."""

    model: str
    inputs: dict[str, np.ndarray]
    version: int | None = None
    outputs: Sequence[str] | None = None
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceResult:
    """The outputs of one request and exactly which version produced them."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    specs: tuple[TensorSpec, ...]
    id: str | None = None
    sha256: str = ""
    reason: str = ""  # why this version answered (the route's reason), for the prediction log


class Observer(Protocol):
    """Sees every answered request. Must return at once (queue work, never compute)."""

    def observe(
        self, version: ModelVersion, request: InferenceRequest, result: InferenceResult
    ) -> None: ...


class FailureObserver(Protocol):
    """Sees every request that failed once its version was chosen. Must return at once."""

    def failed(
        self, version: ModelVersion, request: InferenceRequest, error: Exception, reason: str
    ) -> None: ...


class InferenceService:
    """Validates, dispatches to the chosen version's batcher, records stats, tells observers.

    The version is chosen before (``server.core.routing``); the data plane is
    the only caller.
    """

    def __init__(
        self, observers: Sequence[Observer] = (), failures: Sequence[FailureObserver] = ()
    ) -> None:
        self._observers = tuple(observers)
        self._failures = tuple(failures)

    async def infer(self, route: Route, request: InferenceRequest) -> InferenceResult:
        """Run one request; raises a ServingError subclass for anything the caller can fix."""
        mv = route.serving
        if mv.dispatcher is None and mv.successor is not None:
            mv = _successor(mv)  # reloaded since the request was routed
        started = time.perf_counter_ns()
        try:
            result = await self._infer(mv, request)
        except ServingError as exc:
            mv.stats.record_request(False, time.perf_counter_ns() - started, type(exc).__name__)
            for failure in self._failures:
                try:
                    failure.failed(mv, request, exc, route.reason)
                except Exception:  # never mask the client's error
                    log.exception("failure observer %r failed", failure)
            raise
        mv.stats.record_request(True, time.perf_counter_ns() - started)
        result.reason = route.reason
        if route.reason is Reason.FALLBACK:
            mv.stats.fallback_count += 1
        for observer in self._observers:
            try:
                observer.observe(mv, request, result)
            except Exception:  # an observer must never fail a client's request
                log.exception("observer %r failed", observer)
        return result

    async def _infer(self, mv: ModelVersion, request: InferenceRequest) -> InferenceResult:
        specs = _requested_outputs(mv, request.outputs)
        deadline = _deadline(mv.name, request.parameters)
        cache = mv.cache
        outputs: Mapping[str, np.ndarray] | None = None
        key: bytes | None = None
        if cache is not None:
            # A row found in the cache is byte for byte a row that passed validation before.
            outputs, key = cache.lookup(request.inputs)
        if outputs is None:
            inputs, rows = validate_inputs(mv.name, mv.signature, request.inputs)
            dispatcher = mv.dispatcher
            if dispatcher is None:
                raise ModelNotReady(f"model '{mv.name}' version {mv.version} is being unloaded")
            if key is not None and dispatcher is cache:
                outputs = await cache.submit_one(inputs, key, deadline)  # key built once
            else:
                outputs = await dispatcher.submit(inputs, rows, deadline)
        selected = {}
        for spec in specs:
            array = outputs[spec.name]
            if array.dtype != spec.numpy_dtype:
                array = array.astype(spec.numpy_dtype)
            selected[spec.name] = array
        return InferenceResult(mv.name, mv.version, selected, specs, request.id, mv.sha256)


def _successor(mv: ModelVersion) -> ModelVersion:
    """The version that replaced ``mv`` in a reload (the newest, after several)."""
    while mv.dispatcher is None and mv.successor is not None:
        mv = mv.successor
    return mv


def _requested_outputs(mv: ModelVersion, names: Sequence[str] | None) -> tuple[TensorSpec, ...]:
    if names is None:
        return mv.signature.outputs
    by_name = {spec.name: spec for spec in mv.signature.outputs}
    chosen = []
    for name in names:
        spec = by_name.get(name)
        if spec is None:
            raise InvalidInput(
                f"model '{mv.name}': unknown output '{name}' requested "
                f"(outputs: {', '.join(by_name)})"
            )
        chosen.append(spec)
    return tuple(chosen)


def _deadline(model: str, parameters: Mapping[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter, in microseconds, as a monotonic deadline."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise InvalidInput(
            f"model '{model}': parameter 'timeout' must be a non-negative number of "
            f"microseconds, got {timeout!r}"
        )
    if timeout == 0:
        return None
    return time.monotonic() + timeout / 1e6
