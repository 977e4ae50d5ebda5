"""Where the load goes (base URL, model, version) and what the model says it takes."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from loadtest.errors import MetadataError, RemoteTargetRefused, TargetUnreachable, UsageError
from loadtest.http import request_once

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True, slots=True)
class Target:
    """One Open Inference Protocol endpoint for one model (and optionally one version)."""

    host: str
    port: int
    model: str
    version: str | None = None
    prefix: str = ""

    @classmethod
    def from_url(
        cls, url: str, model: str, version: str | None = None, *, allow_remote: bool = False
    ) -> Target:
        """Parse ``http://host:port[/prefix]``; only loopback hosts unless ``allow_remote``."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise UsageError(f"only http:// targets are supported, got {url!r}")
        host = parts.hostname
        if not host:
            raise UsageError(f"no host in target URL {url!r}")
        if not allow_remote and not is_loopback(host):
            raise RemoteTargetRefused(
                f"refusing to load-test {host!r}: only localhost/127.0.0.1 unless --allow-remote"
            )
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise UsageError(f"bad port in target URL {url!r}") from exc
        if not model:
            raise UsageError("a model name is required")
        return cls(host, port, model, version, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def model_path(self) -> str:
        path = f"{self.prefix}/v2/models/{quote(self.model, safe='')}"
        if self.version:
            path += f"/versions/{quote(self.version, safe='')}"
        return path

    @property
    def infer_path(self) -> str:
        return f"{self.model_path}/infer"

    @property
    def label(self) -> str:
        version = f"/{self.version}" if self.version else ""
        return f"http://{self.host_header}{self.prefix} {self.model}{version}"


def is_loopback(host: str) -> bool:
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One input or output as model metadata declares it (-1 marks a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]


def get_request(target: Target, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {target.host_header}\r\nAccept: application/json\r\n\r\n"
    ).encode("latin-1")


async def fetch_json(target: Target, path: str) -> tuple[int, Any]:
    """GET a JSON document; unreachable targets raise ``TargetUnreachable``."""
    try:
        status, body = await request_once(target.host, target.port, get_request(target, path))
    except OSError as exc:
        raise TargetUnreachable(f"{target.label}: {exc.strerror or exc}") from exc
    try:
        return status, orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return status, None


async def fetch_metadata(target: Target) -> ModelMetadata:
    """GET the model metadata, plus feature names from the Triton config when it has them.

    Bound it with ``asyncio.timeout``: a target that accepts but never answers hangs it.
    """
    status, doc = await fetch_json(target, target.model_path)
    if status != 200 or not isinstance(doc, dict):
        detail = doc.get("error") if isinstance(doc, dict) else None
        raise MetadataError(
            f"{target.label}: model metadata GET {target.model_path} answered {status}"
            + (f": {detail}" if detail else "")
        )
    try:
        inputs = tuple(_tensor(t) for t in doc["inputs"])
        outputs = tuple(_tensor(t) for t in doc.get("outputs", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"{target.label}: malformed model metadata ({exc!r})") from exc
    if not inputs:
        raise MetadataError(f"{target.label}: model metadata lists no inputs")
    names = _feature_names(doc)
    if names and not inputs[0].feature_names:
        inputs = (_with_features(inputs[0], names), *inputs[1:])
    elif not any(t.feature_names for t in inputs):
        names = await _config_feature_names(target)
        if names:
            inputs = (_with_features(inputs[0], names), *inputs[1:])
    return ModelMetadata(str(doc.get("name", target.model)), inputs, outputs)


def _tensor(doc: dict[str, Any]) -> TensorMeta:
    names = doc.get("feature_names") or _feature_names(doc)
    return TensorMeta(
        str(doc["name"]),
        str(doc["datatype"]).upper(),
        tuple(int(d) for d in doc["shape"]),
        tuple(str(n) for n in names) if names else (),
    )


def _with_features(tensor: TensorMeta, names: tuple[str, ...]) -> TensorMeta:
    return TensorMeta(tensor.name, tensor.datatype, tensor.shape, names)


def _feature_names(doc: dict[str, Any]) -> tuple[str, ...]:
    """Feature names from ``properties``/``parameters``, as a list or a comma string."""
    for key in ("properties", "parameters"):
        holder = doc.get(key)
        if not isinstance(holder, dict):
            continue
        value = holder.get("feature_names")
        if isinstance(value, dict):  # Triton config parameter: {"string_value": "a,b"}
            value = value.get("string_value")
        if isinstance(value, str) and value:
            return tuple(v.strip() for v in value.split(","))
        if isinstance(value, list) and value:
            return tuple(str(v) for v in value)
    return ()


async def _config_feature_names(target: Target) -> tuple[str, ...]:
    # Servers without the model_configuration extension answer 4xx; that is fine.
    try:
        status, doc = await fetch_json(target, f"{target.model_path}/config")
    except TargetUnreachable:
        return ()
    if status != 200 or not isinstance(doc, dict):
        return ()
    return _feature_names(doc)
