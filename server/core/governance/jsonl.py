"""Append-only JSON Lines files: a writer thread, size rotation, readers over rotated files.

Several processes (``--workers``, a CLI next to a running server) may append to
one file. Every append takes an exclusive ``flock`` on ``<file>.lock``, reopens
the file if another process rotated it (the inode changed), rotates when the
next write would pass the size limit, writes whole lines with ``O_APPEND`` and,
for the audit log, fsyncs before releasing the lock. Rotation renames the file
to ``<file>.<n>`` (n counting up from 1, the oldest first) and opens a new one,
so no record is ever rewritten or lost; a reader reads ``<file>.1``,
``<file>.2``, ... and then ``<file>``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson

log = logging.getLogger("sluice.governance")

T = TypeVar("T")
_BATCH_RECORDS = 1024  # records per write when batching: bounds how far a file passes its limit
_DROP_WARNING_S = 10.0  # at most one warning about dropped records this often


def rotated_files(path: Path) -> list[Path]:
    """``path``'s rotated files, oldest first, then ``path`` itself if it exists."""
    numbered = []
    if path.parent.is_dir():
        prefix = path.name + "."
        for item in path.parent.iterdir():
            suffix = item.name[len(prefix) :]
            if item.name.startswith(prefix) and suffix.isdigit():
                numbered.append((int(suffix), item))
    files = [item for _, item in sorted(numbered)]
    return [*files, path] if path.is_file() else files


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of ``path`` and its rotated files, in the order they were written.

    A line that is not a JSON object (a write cut short by a crash) is skipped.
    """
    for file in rotated_files(path):
        with file.open("rb") as handle:
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


class JsonLinesFile:
    """One append-only file, safe to share between processes; call from one thread."""

    def __init__(self, path: Path, *, rotate_bytes: int, fsync: bool) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def append(self, data: bytes) -> None:
        """Append whole lines; rotate first if they would take the file past the limit."""
        with self._locked():
            fd = self._current()
            size = os.fstat(fd).st_size
            if size and size + len(data) > self.rotate_bytes:
                fd = self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = self.path.with_name(self.path.name + ".lock")
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _current(self) -> int:
        """The open file, reopened when another process rotated it away."""
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def _rotate(self) -> int:
        files = rotated_files(self.path)
        last = files[-2] if len(files) > 1 else None
        number = int(last.name.rsplit(".", 1)[1]) + 1 if last is not None else 1
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{number}"))
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename survives a crash
        finally:
            os.close(directory)
        return self._current()


class LineWriter(Generic[T]):
    """A bounded queue in front of a ``JsonLinesFile``, drained by one writer thread.

    ``put`` never blocks (the event loop calls it); a full queue drops the item
    and counts it. ``render`` turns an item into one line in the writer thread.
    With ``per_record`` each item is its own write (and fsync); otherwise a
    drained batch is one write.
    """

    def __init__(
        self,
        file: JsonLinesFile,
        render: Callable[[T], bytes],
        *,
        queue_size: int,
        per_record: bool,
        name: str,
    ) -> None:
        self.file = file
        self._render = render
        self._queue: deque[T] = deque()
        self._limit = queue_size
        self._per_record = per_record
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._closing = False
        self.put_count = 0
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._warned_dropped = 0
        self._next_warning = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> bool:
        """Queue one item; False (and counted) when the queue is full or the writer closed."""
        if self._closing or len(self._queue) >= self._limit:
            self.dropped += 1
            return False
        self._queue.append(item)
        self.put_count += 1
        if not self._wake.is_set():
            self._wake.set()
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        target = self.put_count
        with self._done:
            return self._done.wait_for(lambda: self.written + self.failed >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the thread, close the file."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Closing the file under a writer that is still busy would lose its records.
            log.warning(
                "%s: writer still busy after %.0f s; left to finish", self.file.path, timeout
            )
            return
        self.file.close()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # Cleared before draining: an item put after the drain sets it again.
            self._wake.clear()
            batch: list[T] = []
            while self._queue:
                batch.append(self._queue.popleft())
            if batch:
                self._write(batch)
            self._warn_dropped()
            if self._closing and not self._queue:
                return

    def _warn_dropped(self) -> None:
        dropped = self.dropped
        if dropped != self._warned_dropped and time.monotonic() >= self._next_warning:
            log.warning(
                "%s: %d record(s) dropped so far: the writer fell behind (queue of %d)",
                self.file.path,
                dropped,
                self._limit,
            )
            self._warned_dropped = dropped
            self._next_warning = time.monotonic() + _DROP_WARNING_S

    def _write(self, batch: list[T]) -> None:
        size = 1 if self._per_record else _BATCH_RECORDS
        groups = [batch[i : i + size] for i in range(0, len(batch), size)]
        for group in groups:
            try:
                self.file.append(b"".join(self._render(item) for item in group))
                ok, bad = len(group), 0
            except Exception:
                log.exception("cannot write %d record(s) to %s", len(group), self.file.path)
                ok, bad = 0, len(group)
            with self._done:
                self.written += ok
                self.failed += bad
                self._done.notify_all()
