"""The compiled trees of an XGBoost version, prepared in a child process (a load while serving).

Preparing them costs about 0.6 s of CPU for 300 trees: the conversion to ONNX
(0.4 s of pure Python in onnxmltools), the parity check on the version's rows
and the executor timings. In a process that is serving, that work would hold
the GIL and the CPU the event loop and the inference threads need. So the
child (``python -m server.core.runtimes.isolated``, run only on CPU time
nothing else wants: SCHED_IDLE) does all of it and hands back the ONNX bytes,
the parity figure and the timings; the serving process only opens an ONNX
Runtime session over the bytes. The child scores with the same libraries on
the same rows, so its parity figure is the one this process would measure;
its timings are taken at low priority on a busy machine, which the median of
alternating calls mostly shrugs off.

Protocol: the request is JSON on stdin; the answer on stdout is a 4-byte
big-endian header length, a JSON header and the ONNX bytes. A version that
cannot be compiled exits 3 with the reason as the last line of stderr.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from server.core.priority import idle_process
from server.core.runtimes.base import CompileError, ExecutorTiming
from server.core.signature import Datatype, Signature, TensorSpec

if TYPE_CHECKING:
    from server.core.runtimes.compiled import CompiledTrees
    from server.core.runtimes.xgboost import XGBoostRuntime

TIMEOUT_S = 300.0  # a preparation that takes longer has hung
EXIT_CANNOT_COMPILE = 3


def prepare(
    xgboost: XGBoostRuntime,
    artifact: Path,
    signature: Signature,
    options: Mapping[str, Any],
    tolerance: float,
) -> tuple[CompiledTrees, float, int, tuple[ExecutorTiming, ...]]:
    """The compiled trees (opened here), their parity, rows checked and timings."""
    from server.core.runtimes.compiled import CompiledTrees

    request = {
        "artifact": str(artifact),
        "signature": {"inputs": _specs(signature.inputs), "outputs": _specs(signature.outputs)},
        "options": dict(options),
        "tolerance": tolerance,
    }
    command = [sys.executable, "-m", __name__]
    try:
        with subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as child:
            idle_process(child.pid)  # before its interpreter has finished starting
            try:
                stdout, stderr = child.communicate(orjson.dumps(request), timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                raise
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompileError(f"the preparation process failed: {exc}") from exc
    if child.returncode != 0:
        said = stderr.decode(errors="replace").strip().splitlines()
        if child.returncode == EXIT_CANNOT_COMPILE and said:
            raise CompileError(said[-1])
        raise CompileError(
            f"the preparation process exited {child.returncode}: {said[-1] if said else ''}"
        )
    size = int.from_bytes(stdout[:4], "big")
    header = orjson.loads(stdout[4 : 4 + size])
    compiled = CompiledTrees(
        stdout[4 + size :],
        header["objective"],
        xgboost.input_name,
        xgboost.output_name,
        xgboost.dtype,
    )
    timings = tuple(ExecutorTiming(**t) for t in header["timings"])
    return compiled, float(header["parity"]), int(header["rows"]), timings


def _specs(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "datatype": s.datatype.value,
            "shape": list(s.shape),
            "feature_names": list(s.feature_names),
            "allow_nonfinite": s.allow_nonfinite,
        }
        for s in specs
    ]


def _signature(doc: Mapping[str, Any]) -> Signature:
    def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                name=i["name"],
                datatype=Datatype(i["datatype"]),
                shape=tuple(i["shape"]),
                feature_names=tuple(i["feature_names"]),
                allow_nonfinite=bool(i["allow_nonfinite"]),
            )
            for i in items
        )

    return Signature(inputs=specs(doc["inputs"]), outputs=specs(doc["outputs"]))


def _child() -> int:
    """Convert, check and time; the answer on stdout (see the module's docstring)."""
    idle_process(0)  # the serving process comes first (again, in case the parent could not)
    from server.core.runtimes.hybrid import compile_and_check, measure
    from server.core.runtimes.xgboost import XGBoostRuntime

    request = orjson.loads(sys.stdin.buffer.read())
    artifact = Path(request["artifact"])
    signature = _signature(request["signature"])
    xgboost = XGBoostRuntime(artifact, signature, request["options"])
    try:
        compiled, parity, rows = compile_and_check(
            xgboost, artifact, signature, float(request["tolerance"])
        )
    except CompileError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CANNOT_COMPILE
    timings = measure(xgboost, compiled, rows, xgboost.input_name)
    header = orjson.dumps(
        {
            "objective": compiled.objective,
            "parity": parity,
            "rows": len(rows),
            "timings": [
                {"executor": t.executor, "rows": t.rows, "micros": t.micros} for t in timings
            ],
        }
    )
    sys.stdout.buffer.write(len(header).to_bytes(4, "big") + header + compiled.model)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
