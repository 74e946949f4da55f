"""`AuditLogWriter`: signed, chained JSONL lines, written and fsynced in batches by one thread."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cave.audit import chain, files
from cave.audit.event import AuditEvent
from cave.audit.scrub import scrub
from cave.audit.settings import AuditSettings
from cave.errors import AuditLogError, ConfigError, ConflictError

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_CLOSED = "the audit log writer is closed"
_Waiter = TypeVar("_Waiter")


class _Batch:
    """Lines written and fsynced together, and how to wake those who wait for them."""

    __slots__ = ("lines", "first_seq", "last_seq", "waiters", "futures", "error")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.first_seq = self.last_seq = 0
        # A lock per waiting thread, not one Event: woken threads would queue again for its lock.
        self.waiters: list[threading.Lock] = []
        self.futures: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self.error: str | None = None

    def add(self, line: bytes, seq: int) -> None:
        if not self.lines:
            self.first_seq = seq
        self.lines.append(line)
        self.last_seq = seq

    def waiter(self) -> threading.Lock:
        """A held lock that `finish` releases."""
        waiter = threading.Lock()
        waiter.acquire()
        self.waiters.append(waiter)
        return waiter

    def future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of the caller's own (cancelling it touches nobody else's)."""
        future = loop.create_future()
        self.futures.setdefault(loop, []).append(future)
        return future

    def finish(self, error: str | None = None) -> None:
        self.error = error
        for waiter in self.waiters:
            waiter.release()
        for loop, futures in self.futures.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, futures)  # one wake-up per loop and batch

    def check(self) -> None:
        if self.error is not None:
            raise AuditLogError(self.error)


def _settle(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # done: its task was cancelled
            future.set_result(None)


class AuditLogWriter:
    """Appends audit events to `settings.path`; thread-safe; `close()` it (or use `with`).

    `append` returns once the event's line is on disk (fsync policy "always" or "batch"; "never"
    returns at once). Under "batch", a flusher thread writes and fsyncs every line that arrived
    while the previous fsync ran (group commit), so many threads share one fsync.
    """

    def __init__(self, settings: AuditSettings) -> None:
        self._signer = chain.Signer(settings.key_bytes())
        self._path = settings.path
        self._policy = settings.fsync
        self._interval_s = settings.fsync_interval_ms / 1000
        self._max_bytes = settings.max_bytes
        self._scrub = settings.scrub
        self._lock_fd, self._fd = _open(self._path)
        try:
            tail = files.recover(self._fd, self._path, self._signer)
        except BaseException:
            os.close(self._fd)
            os.close(self._lock_fd)
            raise
        # Owned by the appenders, under _lock:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._seq, self._prev = tail.seq, tail.mac
        self._open = _Batch()
        self._queue: deque[_Batch] = deque()  # closed batches waiting for the flusher
        self._error: str | None = None  # set once closed or failed: appends then raise it
        self._closing = self._sleeping = False
        self._want = 1  # pending lines that end the flusher's linger
        # Owned by the flusher thread:
        self._size, self._first_seq = tail.size, tail.first_seq
        self._last_batch, self._last_fsync_s = 1, 0.0
        self._thread = threading.Thread(target=self._flush_loop, name="audit-flusher", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def head(self) -> tuple[int, str]:
        """(seq, mac) of the last line appended: record it elsewhere to detect a cut-off end."""
        with self._lock:
            return self._seq, self._prev

    def append(self, event: AuditEvent) -> int:
        """Sign and append `event`; its seq once the line is durable (see the fsync policy)."""
        seq, batch, waiter = self._enqueue(self._fields(event), _Batch.waiter)
        if waiter is not None:
            waiter.acquire()
            batch.check()
        return seq

    async def append_async(self, event: AuditEvent) -> int:
        """`append` for asyncio: waits without a thread, many tasks sharing one wake-up.

        A task cancelled while it waits does not take its line back: it is written all the same.
        """
        loop = asyncio.get_running_loop()
        seq, batch, future = self._enqueue(self._fields(event), lambda b: b.future(loop))
        if future is not None:
            await future
            batch.check()
        return seq

    def close(self) -> None:
        """Write and fsync what is pending, stop the flusher, release the file."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._error = self._error or _CLOSED
            self._wake.notify()
        self._thread.join()
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            os.close(self._lock_fd)

    def __enter__(self) -> AuditLogWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fields(self, event: AuditEvent) -> dict[str, Any]:
        fields = event.fields()
        if self._scrub:
            fields["details"] = scrub(fields["details"])
            fields["target"] = scrub(fields["target"])
        return fields

    def _enqueue(
        self, fields: dict[str, Any], wait: Callable[[_Batch], _Waiter]
    ) -> tuple[int, _Batch, _Waiter | None]:
        """Sign and queue the line; `wait(batch)` (unless fsync is "never") how to wait for it."""
        with self._lock:
            if self._error is not None:
                raise AuditLogError(self._error)
            seq = self._seq + 1
            line, mac = self._line(fields, seq, self._prev)  # may refuse the fields
            self._seq, self._prev = seq, mac
            batch = self._open
            batch.add(line, seq)
            waiter = None if self._policy == "never" else wait(batch)
            if self._policy == "always":  # one line per write and fsync
                self._queue.append(batch)
                self._open = _Batch()
            if self._sleeping and (self._queue or len(batch.lines) >= self._want):
                self._wake.notify()
        return seq, batch, waiter

    def _line(self, fields: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
        """The signed line and its MAC (the one step bench/audit_append.py's baseline replaces)."""
        return self._signer.seal(fields, seq, prev)

    def _flush_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._write(batch)

    def _next_batch(self) -> _Batch | None:
        """The next batch to write, once there is one; None when closing and all is written."""
        with self._lock:
            while not self._queue and not self._open.lines:
                if self._closing:
                    return None
                self._sleep(None)
            if not self._queue:
                self._linger()
            if self._queue:
                return self._queue.popleft()
            batch, self._open = self._open, _Batch()
            return batch

    def _linger(self) -> None:
        """Give the open batch a moment to fill, so that one fsync covers more lines."""
        if self._policy == "never":  # nobody waits: write to the OS once per interval
            want, limit_s = sys.maxsize, self._interval_s
        else:  # as many lines as the last batch had, for at most one fsync's time
            want, limit_s = self._last_batch, min(self._interval_s, self._last_fsync_s)
        deadline = time.monotonic() + limit_s
        self._want = want
        while len(self._open.lines) < want and not self._closing:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            self._sleep(remaining_s)
        self._want = 1

    def _sleep(self, timeout_s: float | None) -> None:
        self._sleeping = True
        self._wake.wait(timeout_s)
        self._sleeping = False

    def _write(self, batch: _Batch) -> None:
        data = b"".join(batch.lines)
        try:
            _write_all(self._fd, data)
            if self._policy != "never":
                started = time.perf_counter()
                os.fdatasync(self._fd)
                self._last_fsync_s = time.perf_counter() - started
        except OSError as exc:
            self._fail(f"{self._path}: cannot write the audit log: {exc.strerror or exc}", batch)
            return
        self._size += len(data)
        self._first_seq = self._first_seq or batch.first_seq
        self._last_batch = len(batch.lines)
        batch.finish()
        if self._size >= self._max_bytes:
            try:
                self._rotate(batch.last_seq)
            except OSError as exc:
                self._fail(f"{self._path}: cannot rotate the audit log: {exc.strerror or exc}")

    def _rotate(self, last_seq: int) -> None:
        """Move the full live file aside; the chain goes on in a new one."""
        target = files.rotated_name(self._path, self._first_seq or last_seq, last_seq)
        if target.exists():
            raise FileExistsError(17, f"{target} exists already")
        os.rename(self._path, target)
        fd = os.open(self._path, _OPEN_FLAGS, 0o640)
        os.close(self._fd)
        self._fd, self._size, self._first_seq = fd, 0, None
        _fsync_directory(self._path.parent)

    def _fail(self, message: str, batch: _Batch | None = None) -> None:
        """After a failed write the chain on disk is unknown: refuse every later append."""
        with self._lock:
            self._error = message
            failed = [*([batch] if batch else []), *self._queue, self._open]
            self._queue.clear()
            self._open = _Batch()
        for each in failed:
            each.finish(message)


def open_audit_log(settings: AuditSettings) -> AuditLogWriter | None:
    """A writer when the audit log is enabled, else None."""
    return AuditLogWriter(settings) if settings.enabled else None


def _open(path: Path) -> tuple[int, int]:
    """(lock fd, live file fd); one writer per log, also across processes."""
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise ConfigError(f"audit log {path}: cannot open: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock_fd, os.open(path, _OPEN_FLAGS, 0o640)
    except BlockingIOError:
        os.close(lock_fd)
        raise ConflictError(f"audit log {path} is being written by another writer") from None
    except OSError as exc:
        os.close(lock_fd)
        raise ConfigError(f"audit log {path}: cannot open: {exc.strerror or exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
