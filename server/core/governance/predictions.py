"""The prediction log: one JSON line per request, written off the hot path.

A record::

    {"time": "...Z", "ts": 1796112351.1, "request_id": "9f0c...-2a", "model": "fraud",
     "version": 2, "reason": "primary", "status": "ok", "sha256": "832a...",
     "inputs": {"features": {"amount": [12.5], "customer_age": ["hmac-sha256:5e1c..."]}},
     "outputs": {"probability": [0.013]}}

``inputs``/``outputs`` appear only when ``governance.log_inputs``/``log_outputs``
are on. Fields are named by feature (a column of an input with
``feature_names``) or by tensor, and each is kept, hashed (HMAC-SHA256 under
``governance.hash_key``, so equal values can be matched without being
revealed) or dropped. The observer only queues references; the writer thread
turns them into text, redacts and writes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from server.config import GovernanceSettings, Redaction
from server.core.governance.audit import utc_iso
from server.core.governance.jsonl import JsonLinesFile, LineWriter, read_records
from server.core.registry import ModelVersion
from server.core.service import InferenceRequest, InferenceResult
from server.core.signature import Signature


@dataclass(slots=True)
class PredictionEvent:
    """One answered or failed request, as queued for the writer."""

    ts: float
    request_id: str
    model: str
    version: int
    reason: str
    sha256: str
    error: str
    signature: Signature
    inputs: Mapping[str, np.ndarray] | None
    outputs: Mapping[str, np.ndarray] | None


class Redactor:
    """Keeps, hashes or drops each logged field, by feature or tensor name."""

    def __init__(
        self, fields: Mapping[str, Redaction], default: Redaction, key: bytes | None
    ) -> None:
        self._fields = dict(fields)
        self._default = default
        self._key = key

    def tensors(
        self, arrays: Mapping[str, np.ndarray], features: Mapping[str, tuple[str, ...]]
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for name, array in arrays.items():
            names = features.get(name, ())
            if names and array.ndim == 2 and array.shape[1] == len(names):
                columns = {}
                for index, feature in enumerate(names):
                    action = self._fields.get(feature, self._fields.get(name, self._default))
                    if action != "drop":
                        columns[feature] = self._values(array[:, index], action)
                doc[name] = columns
                continue
            action = self._fields.get(name, self._default)
            if action != "drop":
                doc[name] = self._values(array, action)
        return doc

    def _values(self, array: np.ndarray, action: Redaction) -> Any:
        values = array.tolist()
        if action == "keep":
            return values
        rows = values if isinstance(values, list) else [values]
        return [self.digest(row) for row in rows]

    def digest(self, value: Any) -> str:
        """The keyed hash of one value (its JSON text), as ``hmac-sha256:<hex>``."""
        assert self._key is not None  # settings refuse hashing without a key
        text = orjson.dumps(value, default=_text)
        return "hmac-sha256:" + hmac.new(self._key, text, hashlib.sha256).hexdigest()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class PredictionLog:
    """The observer that queues one record per request; its writer thread writes them."""

    def __init__(self, path: Path, settings: GovernanceSettings) -> None:
        self.path = path
        key = settings.hash_key.get_secret_value().encode() if settings.hash_key else None
        self._redactor = Redactor(settings.fields, settings.default_field, key)
        self._inputs = settings.log_inputs
        self._outputs = settings.log_outputs
        self._writer = LineWriter(
            JsonLinesFile(path, rotate_bytes=settings.rotate_bytes, fsync=False),
            self._line,
            queue_size=settings.prediction_queue,
            per_record=False,
            name="sluice-predictions",
        )

    def observe(
        self, version: ModelVersion, request: InferenceRequest, result: InferenceResult
    ) -> None:
        self._writer.put(
            PredictionEvent(
                time.time(),
                request.id or "",
                version.name,
                version.version,
                result.reason,
                version.sha256,
                "",
                version.signature,
                request.inputs if self._inputs else None,
                result.outputs if self._outputs else None,
            )
        )

    def failed(
        self, version: ModelVersion, request: InferenceRequest, error: Exception, reason: str
    ) -> None:
        self._writer.put(
            PredictionEvent(
                time.time(),
                request.id or "",
                version.name,
                version.version,
                reason,
                version.sha256,
                f"{type(error).__name__}: {error}",
                version.signature,
                request.inputs if self._inputs else None,
                None,
            )
        )

    def flush(self, timeout: float = 10.0) -> bool:
        return self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close()

    @property
    def dropped(self) -> int:
        """Records dropped because the writer fell behind."""
        return self._writer.dropped

    def _line(self, event: PredictionEvent) -> bytes:
        doc: dict[str, Any] = {
            "time": utc_iso(event.ts),
            "ts": event.ts,
            "request_id": event.request_id,
            "model": event.model,
            "version": event.version,
            "reason": event.reason,
            "status": "error" if event.error else "ok",
            "sha256": event.sha256,
        }
        if event.error:
            doc["error"] = event.error
        if event.inputs is not None:
            names = {spec.name: spec.feature_names for spec in event.signature.inputs}
            doc["inputs"] = self._redactor.tensors(event.inputs, names)
        if event.outputs is not None:
            doc["outputs"] = self._redactor.tensors(event.outputs, {})
        return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE, default=_text)


def find_predictions(path: Path, request_id: str, model: str | None = None) -> list[dict[str, Any]]:
    """The prediction records of one request id (normally one), oldest first."""
    return [
        doc
        for doc in read_records(path)
        if doc.get("request_id") == request_id and (model is None or doc.get("model") == model)
    ]
