"""API keys: who may call which route, for which models.

A key is sent as ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` and
stored only as its SHA-256. The check costs one hash of the presented key and
one dict lookup: the ring is indexed by the first 8 bytes of each stored
digest (public information, since an attacker cannot choose digests), and
the full digest is then compared in constant time.

The layer is in the chain only when keys are configured; health stays open
for probes. Keys, digests and ``Authorization`` values never reach a log, a
metric, a span or an error body: answers name the key's id at most.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import ApiKeySettings, ConfigError, SecuritySettings, parse_rate
from server.http.errors import error_response

log = logging.getLogger("sluice.security")

KEY_SCOPE = "sluice.key"  # the scope entry naming the caller's ApiKey (no send/receive in it)
_REALM = 'Bearer realm="sluice"'
_INVALID = f'{_REALM}, error="invalid_token"'
_MISSING = "an API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
_MAX_KEY_CHARS = 512  # longer than any real key: not worth hashing


class Need(Enum):
    """What a route asks of the caller."""

    OPEN = "open"  # health: probes carry no key
    ANY = "any"  # any valid key (the OpenAPI document, unknown paths -> 404 once known)
    INFER = "infer"
    ADMIN = "admin"
    METRICS = "metrics"


@dataclass(frozen=True, slots=True)
class Requirement:
    need: Need
    model: str | None = None  # the model the route is about
    every_model: bool = False  # lists or reports on every model: not for model-limited keys


_OPEN = Requirement(Need.OPEN)
_ANY = Requirement(Need.ANY)
_SERVER_INFO = Requirement(Need.INFER)
_ALL_MODELS = Requirement(Need.INFER, every_model=True)
_INDEX = Requirement(Need.ADMIN, every_model=True)
_METRICS = Requirement(Need.METRICS, every_model=True)
# The last segment of /v2/models/{name}[/versions/{v}]/<action>. An action missing
# here (traffic, approvals, ...) needs admin: new routes fail closed.
_MODEL_ACTIONS = {
    "infer": Need.INFER,
    "ready": Need.INFER,
    "config": Need.INFER,
    "stats": Need.INFER,
    "drift": Need.METRICS,
    "feedback": Need.ADMIN,
}
_FIXED = {
    "/v2/health/live": _OPEN,
    "/v2/health/ready": _OPEN,
    "/v2": _SERVER_INFO,
    "/v2/": _SERVER_INFO,
    "/v2/models": _ALL_MODELS,
    "/v2/models/stats": _ALL_MODELS,
    "/v2/repository/index": _INDEX,
    "/metrics": _METRICS,
}


_KNOWN_PATHS = 4096  # paths whose requirement is remembered (a dict lookup next time)


class Requirements:
    """``requirement`` with the answers for recent paths remembered, at most ``_KNOWN_PATHS``.

    The paths are the clients' to choose: the memory is cleared when full.
    """

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[str, Requirement] = {}

    def of(self, path: str) -> Requirement:
        found = self._known.get(path)
        if found is None:
            if len(self._known) >= _KNOWN_PATHS:
                self._known.clear()
            found = self._known[path] = requirement(path)
        return found


def requirement(path: str) -> Requirement:
    """What ``path`` asks of the caller, from the path alone (the router has not run yet)."""
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed
    parts = path.split("/")
    # ['', 'v2', 'models', name, ...] or ['', 'v2', 'repository', 'models', name, action]
    if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        rest = parts[4:]
        if len(rest) >= 2 and rest[0] == "versions":
            rest = rest[2:]
        if not rest:
            return Requirement(Need.INFER, parts[3])  # metadata
        if len(rest) == 1:
            return Requirement(_MODEL_ACTIONS.get(rest[0], Need.ADMIN), parts[3])
        return Requirement(Need.ADMIN, parts[3])
    if len(parts) == 6 and parts[1:4] == ["v2", "repository", "models"] and parts[4]:
        return Requirement(Need.ADMIN, parts[4])
    return _ANY


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key as the server holds it: its id, digest, scopes and limits."""

    id: str
    digest: bytes
    scopes: frozenset[str]
    models: frozenset[str] | None
    rate: tuple[int, float] | None  # (requests, period seconds); None: the default

    @classmethod
    def of(cls, entry: ApiKeySettings) -> ApiKey:
        return cls(
            id=entry.id,
            digest=bytes.fromhex(entry.sha256),
            scopes=frozenset(entry.scopes),
            models=frozenset(entry.models) if entry.models is not None else None,
            rate=parse_rate(entry.rate_limit) if entry.rate_limit is not None else None,
        )


class KeyRing:
    """The keys in force.

    A key seen before is a dict lookup (only keys that matched are remembered,
    so at most one entry per configured key; the dict's hash is salted per
    process). A new one costs a SHA-256, a lookup by the digest's first 8
    bytes and a constant-time compare of the whole digest.
    """

    __slots__ = ("_index", "_matched", "size")

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        index: dict[bytes, tuple[ApiKey, ...]] = {}
        for key in keys:
            index[key.digest[:8]] = (*index.get(key.digest[:8], ()), key)
        self._index = index
        self._matched: dict[bytes, ApiKey] = {}
        self.size = sum(len(found) for found in index.values())

    def find(self, presented: bytes) -> ApiKey | None:
        known = self._matched.get(presented)
        if known is not None:
            return known
        digest = hashlib.sha256(presented).digest()
        for key in self._index.get(digest[:8], ()):
            if hmac.compare_digest(key.digest, digest):
                self._matched[presented] = key  # one entry per configured key at most
                return key
        return None


class _KeysFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: tuple[ApiKeySettings, ...] = ()


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys in ``path``; ``ConfigError`` naming the file (never its contents) if unusable."""
    try:
        doc = yaml.load(path.read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        parsed = _KeysFile.model_validate(doc if doc is not None else {})
    except OSError as exc:
        raise ConfigError(f"keys file {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(f"keys file {path} is not valid YAML") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        # Only the location and pydantic's message: never the offending value.
        raise ConfigError(f"keys file {path}: invalid '{where}': {first['msg']}") from None
    ids = [key.id for key in parsed.keys]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"keys file {path}: key ids must be unique")
    return [ApiKey.of(entry) for entry in parsed.keys]


class KeySource:
    """The keys from the settings plus the keys file, re-read when the file changes.

    The file's identity (inode, size, mtime) is checked at most every
    ``reload_s``; a change is read in a thread while requests go on with the
    keys in force. A file that turns bad keeps the last good keys and logs.
    """

    def __init__(self, settings: SecuritySettings) -> None:
        self._static = [ApiKey.of(entry) for entry in settings.keys]
        self._path = settings.keys_file
        self._every = settings.keys_reload_s
        self._next = 0.0
        self._seen: tuple[int, int, int] | None = None
        self._reload: asyncio.Task[None] | None = None
        self.reloads = 0  # successful re-reads after start-up
        filed: list[ApiKey] = []
        if self._path is not None:
            self._seen = self._identity()
            filed = read_keys_file(self._path)
        self.ring = self._merge(filed)

    def current(self) -> KeyRing:
        """The ring in force; at most every ``reload_s`` also looks at the file."""
        if self._path is not None and time.monotonic() >= self._next:
            self._check()
        return self.ring

    def _check(self) -> None:
        self._next = time.monotonic() + self._every
        if self._reload is not None and not self._reload.done():
            return
        identity = self._identity()
        if identity == self._seen:
            return
        self._seen = identity
        self._reload = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self._path is not None
        try:
            keys = await asyncio.to_thread(read_keys_file, self._path)
        except ConfigError as exc:
            log.error("keeping the %d key(s) in force: %s", self.ring.size, exc)
            return
        self.ring = self._merge(keys)
        self.reloads += 1
        log.info("keys file %s re-read: %d key(s) in force", self._path, self.ring.size)

    def _identity(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _merge(self, filed: list[ApiKey]) -> KeyRing:
        ids = {key.id for key in self._static}
        clash = sorted(key.id for key in filed if key.id in ids)
        if clash:
            log.warning("keys file repeats settings key id(s) %s; both are in force", clash)
        return KeyRing([*self._static, *filed])

    async def close(self) -> None:
        """Wait for a re-read in progress (the lifespan calls this at shutdown)."""
        if self._reload is not None:
            await asyncio.gather(self._reload, return_exceptions=True)


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key from ``Authorization: Bearer`` or ``x-api-key``; None when neither is sent."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return None


class ApiKeyAuth:
    """The authentication layer: 401 without a valid key, 403 outside the key's scopes."""

    def __init__(self, app: ASGIApp, keys: KeySource) -> None:
        self.app = app
        self.keys = keys
        self.requirements = Requirements()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        need = self.requirements.of(scope["path"])
        if need.need is Need.OPEN:
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope["headers"])
        if not presented:
            await _refuse(401, _MISSING, _REALM, scope, receive, send)
            return
        key = self.keys.current().find(presented) if len(presented) <= _MAX_KEY_CHARS else None
        if key is None:
            await _refuse(401, "the API key is not valid", _INVALID, scope, receive, send)
            return
        refusal = _forbidden(key, need, scope)
        if refusal is not None:
            message, challenge = refusal
            await _refuse(403, message, challenge, scope, receive, send)
            return
        scope[KEY_SCOPE] = key
        await self.app(scope, receive, send)


def _forbidden(key: ApiKey, need: Requirement, scope: Scope) -> tuple[str, str] | None:
    route = f"{scope['method']} {scope['path']}"
    if need.need is not Need.ANY and need.need.value not in key.scopes:
        challenge = f'{_REALM}, error="insufficient_scope", scope="{need.need.value}"'
        return f"key '{key.id}' lacks the '{need.need.value}' scope for {route}", challenge
    if key.models is None:
        return None
    challenge = f'{_REALM}, error="insufficient_scope"'
    if need.model is not None and need.model not in key.models:
        return f"key '{key.id}' is not allowed to use model '{need.model}'", challenge
    if need.every_model:
        return (
            f"key '{key.id}' is limited to named models and cannot use {route}; ask for "
            "each model by name",
            challenge,
        )
    return None


async def _refuse(
    status: int, message: str, challenge: str, scope: Scope, receive: Receive, send: Send
) -> None:
    await error_response(status, message, {"WWW-Authenticate": challenge})(scope, receive, send)
