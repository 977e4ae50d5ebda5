"""Server settings: one frozen model from a YAML file, ``SLUICE_*`` variables and flags.

Precedence: flags > environment > file > defaults. Validation is eager and a
bad value is reported as one line naming the setting and where it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "SLUICE_"
# ``SLUICE_DRIFT__PSI_ALERT`` sets ``drift.psi_alert``: a double underscore descends a section.
NESTED = "__"


class _Section(BaseModel):
    """A nested settings section; a bare boolean (``SLUICE_TELEMETRY=false``) sets ``enabled``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if isinstance(value, bool | str | int):
            return {"enabled": value}
        return value


class TelemetrySettings(_Section):
    """Metrics, traces and exporters. The standard ``OTEL_*`` variables apply on top."""

    service_name: str = Field(
        default="sluice", min_length=1, description="service.name unless OTEL_SERVICE_NAME is set"
    )
    prometheus: bool = Field(default=True, description="serve a Prometheus scrape at /metrics")
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP push base URL (else OTEL_EXPORTER_OTLP_ENDPOINT; unset: no push)",
    )
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        default=None, description="else OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf"
    )
    export_interval_s: float | None = Field(
        default=None, gt=0, description="OTLP metric push period (else OTEL_METRIC_EXPORT_INTERVAL)"
    )
    tracing: bool = Field(default=False, description="a span per request and per batch")
    trace_sample_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="parent-based ratio sampler (else OTEL_TRACES_SAMPLER)",
    )


class DriftSettings(_Section):
    """Data and prediction drift against each version's reference.json."""

    window_rows: int = Field(default=5000, ge=10, description="rows per sub-window")
    window_s: float = Field(default=900.0, gt=0, description="a sub-window closes after this")
    windows: int = Field(default=4, ge=1, le=1000, description="sub-windows in the live window")
    min_rows: int = Field(default=100, ge=1, description="rows before a status is given")
    psi_warn: float = Field(default=0.1, gt=0)
    psi_alert: float = Field(default=0.25, gt=0)
    js_warn: float | None = Field(default=None, gt=0, le=1, description="JS distance, base 2")
    js_alert: float | None = Field(default=None, gt=0, le=1, description="JS distance, base 2")
    p_value: float = Field(
        default=0.05, gt=0, lt=1, description="chi-squared significance a shift must also reach"
    )
    interval_s: float = Field(default=10.0, ge=0, description="metric gauges refresh period")
    queue_size: int = Field(default=10_000, ge=1, description="observations waiting; then dropped")

    @model_validator(mode="after")
    def _ordered(self) -> DriftSettings:
        if self.psi_warn > self.psi_alert:
            raise ValueError(f"psi_warn {self.psi_warn} exceeds psi_alert {self.psi_alert}")
        if self.js_warn is not None and self.js_alert is not None and self.js_warn > self.js_alert:
            raise ValueError(f"js_warn {self.js_warn} exceeds js_alert {self.js_alert}")
        return self


class FeedbackSettings(_Section):
    """Ground-truth labels joined to earlier predictions: live quality and concept drift."""

    max_predictions: int = Field(default=100_000, ge=1, description="predictions kept for labels")
    retention_s: float = Field(default=7 * 86400.0, gt=0, description="how long they are kept")
    window_labels: int = Field(default=5000, ge=10, description="labels in the quality window")
    min_labels: int = Field(default=100, ge=1, description="labels before a status is given")
    auc_margin: float = Field(default=0.05, ge=0, description="absolute drop from the card")
    accuracy_margin: float = Field(default=0.05, ge=0, description="absolute drop from the card")
    log_loss_margin: float = Field(default=0.25, ge=0, description="relative rise over the card")
    mae_margin: float = Field(default=0.25, ge=0, description="relative rise over the card")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), else the count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class RedisSettings(BaseModel):
    """The one Redis a fleet shares: cache entries, feedback joins, traffic state, rate limits.

    Unset, every process keeps that state to itself. Losing Redis degrades to
    local state, never to failed requests: every call is bounded by the timeout
    and a circuit stops calling Redis while it is down.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = Field(default=None, description="redis://host:port/db (unset: no Redis)")
    timeout_ms: float = Field(default=20.0, gt=0, le=10_000, description="per call")
    key_prefix: str = Field(default="sluice:", description="namespace of every key")
    retry_after_s: float = Field(
        default=5.0, gt=0, description="after a failure, how long the circuit stays open"
    )


class CacheSettings(_Section):
    """Where result-cache entries live; each model turns its cache on in model.yaml."""

    backend: Literal["memory", "redis"] = Field(
        default="memory", description="memory: per process; redis: shared (needs redis.url)"
    )


Scope = Literal["infer", "admin", "metrics"]
_RATE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d*)\s*(second|minute|hour|day)s?\s*$")
_PERIOD_S = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/second"``, ``"6000 per minute"``, ``"10/5 second"`` as (requests, period seconds)."""
    match = _RATE.match(text.lower())
    if match is None or int(match[1]) < 1:
        raise ValueError(f"rate {text!r} is not of the form '100/second' (second|minute|hour|day)")
    multiple = int(match[2]) if match[2] else 1
    if multiple < 1:
        raise ValueError(f"rate {text!r}: the period must be at least 1 {match[3]}")
    return int(match[1]), multiple * _PERIOD_S[match[3]]


def _checked_rate(text: str | None) -> str | None:
    if text is not None:
        parse_rate(text)
    return text


class ApiKeySettings(BaseModel):
    """One API key, stored as the SHA-256 of the key: the key itself is never written down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:@-]+$",
        description="a name for the key, shown in logs and 403 answers (never the key)",
    )
    sha256: str = Field(
        pattern=r"^[0-9a-fA-F]{64}$",
        description="hex SHA-256 of the key: printf %s KEY | sha256sum",
    )
    scopes: tuple[Scope, ...] = Field(min_length=1, description="infer, admin, metrics")
    models: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="only these models (unset: every model)"
    )
    rate_limit: str | None = Field(default=None, description="this key's rate (else the default)")

    _valid_rate = field_validator("rate_limit")(lambda cls, v: _checked_rate(v))


class SecuritySettings(BaseModel):
    """Who may call what, and how often. No keys: every route is open (bind to loopback)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: tuple[ApiKeySettings, ...] = Field(default=(), description="keys held in the settings")
    keys_file: Path | None = Field(
        default=None, description="YAML file with a 'keys:' list, re-read when it changes"
    )
    keys_reload_s: float = Field(
        default=1.0, ge=0, description="how often the keys file's mtime is checked"
    )
    rate_limit: str | None = Field(
        default=None,
        description="per key, or per client address without keys; e.g. '100/second' "
        "(unset: no rate limit). Shared through Redis when redis.url is set",
    )

    tls_certfile: Path | None = Field(default=None, description="PEM certificate chain: HTTPS")
    tls_keyfile: Path | None = Field(default=None, description="PEM private key of the certificate")
    tls_ca_certs: Path | None = Field(
        default=None, description="CA bundle: clients must present a certificate it signed (mTLS)"
    )

    _valid_rate = field_validator("rate_limit")(lambda cls, v: _checked_rate(v))

    @model_validator(mode="after")
    def _consistent(self) -> SecuritySettings:
        ids = [key.id for key in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"key ids must be unique, got {ids}")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if self.tls_ca_certs is not None and self.tls_certfile is None:
            raise ValueError(
                "tls_ca_certs (client certificates) needs tls_certfile and tls_keyfile"
            )
        return self

    @property
    def authenticated(self) -> bool:
        """Whether any key is configured (a keys file counts even while it is empty)."""
        return bool(self.keys) or self.keys_file is not None

    @property
    def rate_limited(self) -> bool:
        """Whether any rate may apply: the default, a key's own, or a keys file's."""
        return (
            self.rate_limit is not None
            or self.keys_file is not None
            or any(key.rate_limit is not None for key in self.keys)
        )


class LimitSettings(BaseModel):
    """What one client may hold of the server: connections, time, bytes, concurrency."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="open connections (unset: 4096, or fewer when the file-descriptor limit "
        "is lower); at the limit an idle connection is closed to make room, else a 503",
    )
    max_concurrent_requests: int = Field(
        default=1024, ge=1, description="requests being answered at once; beyond: 503"
    )
    target_latency_ms: float | None = Field(
        default=10.0,
        gt=0,
        description="while requests take longer than this in the server on average, fewer "
        "are let in at once (the rest: 503 at once); unset: max_concurrent_requests only",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="to send the request line and headers, else 408"
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="to send the whole body once the headers are in"
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="an idle keep-alive connection is closed after this"
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, description="request line plus headers, else 431"
    )
    decode_in_thread_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="infer bodies at least this large are decoded off the event loop",
    )
    max_body_bytes_in_flight: int | None = Field(
        default=None,
        ge=1024,
        description="request body bytes held at once by all requests in progress (unset: "
        "4 x max_request_bytes); a body that would pass it gets 503 with Retry-After",
    )


Redaction = Literal["keep", "hash", "drop"]


class GovernanceSettings(BaseModel):
    """Approvals, the audit log and the prediction log (README "Governance").

    State files (audit log, approvals) live in ``state_dir``, by default
    ``<model_repository>/.sluice``: a dot folder is never taken for a model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    state_dir: Path | None = Field(
        default=None, description="audit log and approvals (unset: <model_repository>/.sluice)"
    )
    audit_log: Path | None = Field(
        default=None, description="audit JSON Lines file (unset: <state_dir>/audit.jsonl)"
    )
    rotate_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="a log file is rotated beyond this size"
    )
    require_approval: bool = Field(
        default=False, description="a version needs an approval to take primary or canary traffic"
    )
    prediction_log: Path | None = Field(
        default=None, description="one JSON line per request (unset: no prediction log)"
    )
    prediction_queue: int = Field(
        default=65_536, ge=1, description="records waiting for the writer; beyond: dropped, counted"
    )
    log_inputs: bool = Field(default=False, description="inputs in the prediction log")
    log_outputs: bool = Field(default=False, description="outputs in the prediction log")
    fields: dict[str, Redaction] = Field(
        default_factory=dict,
        description="per feature or tensor name: keep, hash (keyed HMAC-SHA256) or drop",
    )
    default_field: Redaction = Field(
        default="keep", description="for logged fields not named in 'fields'"
    )
    hash_key: SecretStr | None = Field(
        default=None, description="HMAC key for hashed fields (SLUICE_GOVERNANCE__HASH_KEY)"
    )

    @model_validator(mode="after")
    def _key_for_hashing(self) -> GovernanceSettings:
        hashing = self.default_field == "hash" or "hash" in self.fields.values()
        if hashing and (self.log_inputs or self.log_outputs) and not self.hash_key:
            raise ValueError("hashed fields need governance.hash_key")
        return self

    def state_path(self, repository: Path) -> Path:
        return self.state_dir if self.state_dir is not None else repository / ".sluice"

    def audit_path(self, repository: Path) -> Path:
        if self.audit_log is not None:
            return self.audit_log
        return self.state_path(repository) / "audit.jsonl"


class Settings(BaseModel):
    """Everything ``sluice serve`` and ``sluice batch`` can be told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repository: Path = Field(default=Path("models"), description="model repository root")
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    inference_threads: int = Field(
        default_factory=usable_cpus,
        ge=1,
        le=512,
        description="threads that run models (default: the CPUs this process may use)",
    )
    batching: bool = Field(default=True, description="global switch for dynamic batching")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    repository_control: bool = Field(
        default=True, description="allow /v2/repository load and unload calls"
    )
    repository_poll_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="poll the repository every N seconds and load, reload or unload what "
        "changed on disk (unset: read at start and on /v2/repository calls only)",
    )
    strict_readiness: bool = Field(
        default=False, description="server ready only when every model version is ready"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 503")
    http_fast_path: bool = Field(
        default=True,
        description="answer the infer routes straight from ASGI (false: through Starlette's "
        "router and middleware; same answers, more CPU per request)",
    )
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    governance: GovernanceSettings = Field(default_factory=GovernanceSettings)

    @model_validator(mode="after")
    def _redis_for_redis_cache(self) -> Settings:
        if self.cache.backend == "redis" and self.redis.url is None:
            raise ValueError("cache.backend 'redis' needs redis.url")
        return self

    @model_validator(mode="after")
    def _one_body_fits_the_budget(self) -> Settings:
        budget = self.limits.max_body_bytes_in_flight
        if budget is not None and budget < self.max_request_bytes:
            raise ValueError(
                f"limits.max_body_bytes_in_flight ({budget}) is smaller than "
                f"max_request_bytes ({self.max_request_bytes}): a body within the limit "
                "could never be accepted"
            )
        return self

    @property
    def body_budget(self) -> int:
        """Request body bytes all requests in progress may hold at once."""
        budget = self.limits.max_body_bytes_in_flight
        return budget if budget is not None else 4 * self.max_request_bytes


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming it and its source."""


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the three sources and validate once."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        for key, value in _read_file(config_file).items():
            _assign(merged, (key,), value)
            for dotted in _paths(key, value):
                sources[dotted] = f"{config_file}"
    for key, value in (environ if environ is not None else os.environ).items():
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            path = tuple(key[len(ENV_PREFIX) :].lower().split(NESTED))
            _assign(merged, path, value)
            sources[".".join(path)] = f"environment variable {key}"
    for key, value in (flags or {}).items():
        if value is not None:
            _assign(merged, (key,), value)
            sources[key] = f"flag --{key.replace('_', '-')}"
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"] if isinstance(part, str)]
        field = ".".join(loc) if loc else "(settings)"
        prefixes = (".".join(loc[:n]) for n in range(len(loc), 0, -1))
        inside = (v for k, v in sources.items() if k.startswith(f"{field}."))
        where = next((sources[p] for p in prefixes if p in sources), next(inside, "defaults"))
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting '{field}' (from {where})") from exc
        raise ConfigError(f"invalid setting '{field}' (from {where}): {error['msg']}") from exc


def _assign(merged: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``merged[a][b]...`` = value; a later source overrides key by key inside sections."""
    target = merged
    for part in path[:-1]:
        inner = target.get(part)
        if not isinstance(inner, dict):
            inner = {} if inner is None else {"enabled": inner}
            target[part] = inner
        target = inner
    if isinstance(value, dict) and isinstance(target.get(path[-1]), dict):
        for key, item in value.items():
            _assign(target, (path[-1], str(key)), item)
    else:
        target[path[-1]] = value


def _paths(key: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [key] + [p for k, v in value.items() for p in _paths(f"{key}.{k}", v)]
    return [key]


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
