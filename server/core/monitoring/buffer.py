"""What one version's answered requests sent and got back, gathered for the monitoring worker.

The serving path appends each monitored tensor's array to a list per tensor
and the request id to another: a few list appends, no object per request.
Numpy arrays are not tracked by the garbage collector, so thousands of them
waiting for the worker add nothing to collection pauses (a dict or dataclass
per request did: they lived long enough to be promoted, and every full
collection walked them). The worker takes the lists whole and joins each with
one ``np.concatenate``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import cast

import numpy as np

from server.core.registry import ModelVersion
from server.core.signature import Datatype


@dataclass(slots=True)
class Block:
    """The requests taken from a buffer in one go; ``outputs`` lists hold None where a
    request did not ask for that output (then ``partial`` is set)."""

    version: ModelVersion
    inputs: dict[str, list[np.ndarray]]
    outputs: dict[str, list[np.ndarray | None]]
    ids: list[str | None]
    partial: bool
    _joined: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def parts(self, rows: int) -> Iterator[Block]:
        """Consecutive blocks of whole requests, of about ``rows`` rows each (a request
        larger than that is a part of its own); the block itself when it is that small."""
        column: Sequence[np.ndarray | None] | None = next(iter(self.inputs.values()), None)
        if column is None:
            column = next(iter(self.outputs.values()), None)
        if column is None:
            yield self
            return
        # Rows up to and including each request (a request without this output: none).
        ends = list(accumulate(0 if a is None else len(a) for a in column))
        if not ends or ends[-1] <= rows:
            yield self
            return
        start = 0
        while start < len(ends):
            done = ends[start - 1] if start else 0
            stop = max(start + 1, bisect_right(ends, done + rows))
            yield Block(
                self.version,
                {n: a[start:stop] for n, a in self.inputs.items()},
                {n: o[start:stop] for n, o in self.outputs.items()},
                self.ids[start:stop],
                self.partial,
            )
            start = stop

    def _output(self, name: str) -> np.ndarray:
        """Every request's ``name`` output, joined (once per block); only when not partial."""
        joined = self._joined.get(name)
        if joined is None:
            # Not partial: no None in the list.
            joined = self._joined[name] = join(cast(list[np.ndarray], self.outputs[name]))
        return joined

    def sizes(self, name: str) -> list[int]:
        """Rows of each request that has output ``name``."""
        column = self.outputs[name]
        arrays = present(column) if self.partial else cast(list[np.ndarray], column)
        return list(map(len, arrays))

    def joined_inputs(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {name: join(self.inputs[name]) for name in names if name in self.inputs}

    def complete(self, names: Iterable[str]) -> tuple[list[int] | None, dict[str, np.ndarray]]:
        """Outputs ``names`` of the requests that have all of them, joined.

        Returns the positions of those requests (None: every request) and the arrays.
        """
        columns = {n: self.outputs[n] for n in names if n in self.outputs}
        if not self.partial:
            return None, {n: self._output(n) for n in columns}
        keep = [i for i in range(len(self)) if all(c[i] is not None for c in columns.values())]
        if not keep:
            return keep, {}
        return keep, {n: join(present([c[i] for i in keep])) for n, c in columns.items()}


class VersionBuffer:
    """Monitored tensors of one served version, appended per request, taken per block."""

    __slots__ = (
        "_input_lists",
        "_inputs",
        "_output_lists",
        "_outputs",
        "ids",
        "inputs",
        "outputs",
        "partial",
        "version",
    )

    def __init__(self, version: ModelVersion) -> None:
        self.version = version
        signature = version.signature
        # Until the worker knows what the monitors read: every batched numeric tensor.
        self._inputs = [s.name for s in signature.inputs if _monitorable(s.datatype, s.batched)]
        self._outputs = [s.name for s in signature.outputs if _monitorable(s.datatype, s.batched)]
        self.ids: list[str | None] = []
        self.partial = False
        self._lists()

    def _lists(self) -> None:
        self.inputs: dict[str, list[np.ndarray]] = {name: [] for name in self._inputs}
        self.outputs: dict[str, list[np.ndarray | None]] = {name: [] for name in self._outputs}
        self._pairs()

    def _pairs(self) -> None:
        # Tuples, not dict.items(): add() walks them for every request.
        self._input_lists = tuple(self.inputs.items())
        self._output_lists = tuple(self.outputs.items())

    def narrow(self, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        """Keep only the tensors the monitors read (called between blocks)."""
        wanted_in, wanted_out = set(inputs), set(outputs)
        self._inputs = [n for n in self._inputs if n in wanted_in]
        self._outputs = [n for n in self._outputs if n in wanted_out]
        self.inputs = {n: self.inputs[n] for n in self._inputs}
        self.outputs = {n: self.outputs[n] for n in self._outputs}
        self._pairs()

    def add(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        request_id: str | None,
    ) -> None:
        for name, arrays in self._input_lists:
            arrays.append(inputs[name])
        for name, maybe in self._output_lists:
            array = outputs.get(name)
            if array is None:
                self.partial = True
            maybe.append(array)
        self.ids.append(request_id)

    def take(self) -> Block:
        block = Block(self.version, self.inputs, self.outputs, self.ids, self.partial)
        self._lists()
        self.ids = []
        self.partial = False
        return block


def present(arrays: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    return [a for a in arrays if a is not None]


def join(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _monitorable(datatype: Datatype, batched: bool) -> bool:
    return batched and datatype is not Datatype.BYTES
