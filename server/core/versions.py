"""The rules a version passes through on its way in and out of service.

A version serves only once it has answered a test batch (``smoke_test``) and
its batches fail when their float outputs are not finite (``finite_outputs``);
a reload keeps serving whatever failed to rebuild (``keep_serving``); a
version goes out by taking no new requests, finishing what it queued and
only then releasing its runtime (``retire``). The registry applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from server.core.catalog import VersionState
from server.core.dispatch import Tensors
from server.core.runtimes import Runtime, SignatureMismatch
from server.core.signature import FLOAT_TYPES, Signature
from server.errors import RuntimeFailure, ServingError

if TYPE_CHECKING:
    from server.core.registry import ModelEntry, ModelVersion


def keep_serving(current: ModelEntry, entry: ModelEntry) -> ModelEntry:
    """``entry`` with every version that failed to rebuild replaced by the one serving."""
    serving = {v: mv for v, mv in current.versions.items() if mv.state is VersionState.READY}
    if not serving:
        return entry
    if entry.error:
        current.reload_error = f"reload failed, the loaded versions keep serving: {entry.error}"
        return current
    failed = []
    for v, mv in list(entry.versions.items()):
        if mv.state is not VersionState.READY and v in serving:
            failed.append(f"version {v}: {mv.reason}")
            entry.versions[v] = serving[v]
    if failed:
        entry.reload_error = (
            f"reload failed, the loaded artifact keeps serving: {'; '.join(failed)}"
        )
    elif not entry.ready_versions():
        # The policy now selects only versions that failed (a broken new ``latest``): the
        # ones serving stay until a version that works replaces them.
        failed = [f"version {v}: {mv.reason}" for v, mv in sorted(entry.versions.items())]
        entry.versions = {**serving, **entry.versions}
        kept = ", ".join(str(v) for v in sorted(serving))
        entry.reload_error = f"{'; '.join(failed)}; version(s) {kept} keep serving"
    return entry


def finite_outputs(mv: ModelVersion) -> Callable[[Mapping[str, np.ndarray]], Tensors]:
    """The runtime's predict, failing a batch whose float outputs hold NaN or infinity.

    Non-finite scores cannot be trusted (nor written as JSON); a failed batch is
    what the circuit breaker counts. Outputs declared ``allow_nonfinite`` pass.
    """
    assert mv.runtime is not None
    predict = mv.runtime.predict
    checked = tuple(
        o.name for o in mv.signature.outputs if o.datatype in FLOAT_TYPES and not o.allow_nonfinite
    )
    if not checked:
        return predict
    name, version = mv.name, mv.version

    def guarded(inputs: Mapping[str, np.ndarray]) -> Tensors:
        outputs = predict(inputs)
        for output in checked:
            array = outputs.get(output)
            if array is not None and not np.isfinite(array).all():
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                raise RuntimeFailure(
                    f"model '{name}' version {version} produced {bad} non-finite "
                    f"value(s) in output '{output}'"
                )
        return outputs

    return guarded


def smoke_test(runtime: Runtime, signature: Signature) -> None:
    """Predict one row of zeros so a model that loads but cannot run is caught at load time."""
    inputs = {}
    for spec in signature.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        inputs[spec.name] = np.zeros(shape, dtype=spec.numpy_dtype)
    try:
        outputs = runtime.predict(inputs)
    except ServingError as exc:
        raise SignatureMismatch(f"test prediction failed: {exc}") from exc
    missing = [o.name for o in signature.outputs if o.name not in outputs]
    if missing:
        raise SignatureMismatch(f"the model does not produce declared output(s) {missing}")


async def retire(versions: Sequence[ModelVersion]) -> None:
    """Stop each version taking requests, then let it finish what it queued and release it."""
    dispatchers = []
    for mv in versions:
        if mv.state is VersionState.READY:
            mv.state = VersionState.UNLOADING
        if mv.dispatcher is not None:
            dispatchers.append(mv.dispatcher)
        mv.dispatcher = mv.cache = None
    for dispatcher in dispatchers:
        await dispatcher.close()
    for mv in versions:
        while mv.lent:
            mv.returned.clear()
            await mv.returned.wait()
        if mv.runtime is not None:
            mv.runtime.close()
            mv.runtime = None
