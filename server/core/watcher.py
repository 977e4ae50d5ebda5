"""Polling the model repository (``repository_poll_s``): load, reload and unload what changed.

Every interval the watcher takes a fingerprint of each model folder (the
size and modification time of model.yaml and of every file in each version
folder; nothing is read or hashed) and compares it with the one taken when
the model was last loaded. A change is acted on only once the folder has
stayed the same for a whole interval, so that a copy still in progress is
never loaded half-written. Then the model is reloaded (the registry rebuilds
only the versions that changed and keeps serving any that fail to rebuild);
a model that appeared is loaded, one whose folder disappeared is unloaded.
Each action is written to the audit log with the actor ``repository-poll``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from server.core.governance import Action
from server.core.governance.audit import AuditLog
from server.core.registry import ModelRegistry
from server.core.repository import MODEL_FILE

log = logging.getLogger("sluice.watcher")

ACTOR = "repository-poll"

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """(path, size, mtime_ns) of model.yaml and of each file in each version folder."""
    found: list[tuple[str, int, int]] = []
    with contextlib.suppress(OSError):
        for path in [folder / MODEL_FILE, *sorted(folder.iterdir())]:
            if path.is_dir() and path.name.isdigit():
                files = sorted(p for p in path.iterdir() if p.is_file())
            elif path.name == MODEL_FILE:
                files = [path]
            else:
                continue
            for file in files:
                stat = file.stat()
                found.append((str(file.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


class RepositoryWatcher:
    """Keeps the served models in step with the repository on disk."""

    def __init__(
        self, registry: ModelRegistry, interval_s: float, audit: AuditLog | None = None
    ) -> None:
        self._registry = registry
        self._interval = interval_s
        self._audit = audit
        self._loaded: dict[str, Fingerprint] = {}  # as of each model's last load
        self._seen: dict[str, Fingerprint] = {}  # a change seen once, waiting to settle
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take the fingerprints of what start-up loaded, then poll."""
        self._loaded = await asyncio.to_thread(self._scan)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)  # the polling cadence, not a synchronisation
            try:
                await self.poll()
            except Exception:
                log.exception("repository poll failed")

    async def poll(self) -> None:
        """One pass: act on every change that has settled since the previous pass."""
        on_disk = await asyncio.to_thread(self._scan)
        for name, print_ in on_disk.items():
            if self._loaded.get(name) == print_:
                self._seen.pop(name, None)
                continue
            if self._seen.get(name) != print_:
                self._seen[name] = print_  # changed, or still changing: wait one interval
                continue
            del self._seen[name]
            self._loaded[name] = print_
            await self._load(name)
        models = self._registry.models
        for name in [n for n in self._loaded if n not in on_disk]:
            del self._loaded[name]
            self._seen.pop(name, None)
            if name in models and not models[name].unloaded:
                await self._unload(name)

    def _scan(self) -> dict[str, Fingerprint]:
        repository = self._registry.repository
        return {name: fingerprint(repository.root / name) for name in repository.names()}

    async def _load(self, name: str) -> None:
        known = name in self._registry.models
        entry = await self._registry.load(name)
        what = "changed" if known else "appeared"
        log.info("model %s %s on disk: %s", name, what, "reloaded" if known else "loaded")
        if self._audit is not None:
            self._audit.record_entry(
                Action.LOAD, entry, actor=ACTOR, reason=f"model folder {what} on disk"
            )

    async def _unload(self, name: str) -> None:
        await self._registry.unload(name)
        log.info("model %s disappeared from disk: unloaded", name)
        if self._audit is not None:
            self._audit.record_entry(
                Action.UNLOAD,
                self._registry.models[name],
                actor=ACTOR,
                reason="model folder removed from disk",
            )
