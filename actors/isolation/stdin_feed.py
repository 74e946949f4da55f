"""Stdin written while an exec runs: bytes queued on the event loop, drained into the pipe."""

from __future__ import annotations

import asyncio
import os
from collections import deque

from cave.errors import InvalidArgumentError, LimitExceededError, SandboxStateError

MAX_PENDING_BYTES = 1 << 20


class StdinFeed:
    """An exec's stdin, written in pieces: `write` queues, `close` ends it after what is queued.

    Pass it as `Sandbox.exec(..., stdin=feed)`. The exec owns the pipe's write end from then on:
    the feed writes to it only when the pipe has room (non-blocking, woken by `add_writer`), so a
    command that reads slowly never blocks the event loop. Bytes not yet in the pipe are bounded by
    `max_pending_bytes`; a write that would go past it is refused whole, nothing of it queued.
    When the exec ends (or the command closes its stdin), what is queued is dropped and every
    later write raises SandboxStateError. Use it from the event loop that runs the exec.
    """

    def __init__(self, initial: bytes = b"", max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._chunks: deque[memoryview] = deque()
        self._pending = 0
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        self._claimed = False
        self._closing = False  # close() was asked: the pipe closes once the queue is drained
        self._ended: str | None = None  # why nothing more can be written, once that is so
        # The exec's initial stdin is one bounded value the caller already holds: not capped.
        self._enqueue(initial)

    @property
    def pending_bytes(self) -> int:
        """Bytes written to the feed that the pipe has not taken yet."""
        return self._pending

    def write(self, data: bytes) -> None:
        if self._ended is not None:
            raise SandboxStateError(f"cannot write to stdin: {self._ended}")
        if self._closing:
            raise SandboxStateError("cannot write to stdin: it was closed")
        if isinstance(data, bytes) and self._pending + len(data) > self.max_pending_bytes:
            raise LimitExceededError(
                f"stdin has {self._pending} bytes the command has not read yet; "
                f"{len(data)} more would pass the limit of {self.max_pending_bytes}"
            )
        self._enqueue(data)
        self._flush()
        if self._ended is not None:  # the pipe broke under this very write
            raise SandboxStateError(f"cannot write to stdin: {self._ended}")

    def close(self) -> None:
        """End of input: the command sees end of file once it has read what was written."""
        if self._ended is None and not self._closing:
            self._closing = True
            self._flush()

    def _enqueue(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise InvalidArgumentError(f"stdin must be bytes, got {type(data).__name__}")
        if data:
            self._chunks.append(memoryview(data))
            self._pending += len(data)

    # The exec's side: claim before anything starts, attach the pipe, end when the exec ends.

    def claim(self) -> None:
        if self._claimed:
            raise InvalidArgumentError("a StdinFeed serves one exec only")
        self._claimed = True

    def attach(self, fd: int) -> None:
        """Take over the pipe's write end (closed by the feed from now on) and start draining."""
        self._fd, self._loop = fd, asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._flush()

    def end(self, reason: str) -> None:
        """Drop what is queued, close the pipe, refuse later writes. Idempotent."""
        if self._ended is None:
            self._ended = reason
        self._chunks.clear()
        self._pending = 0
        self._close_pipe()

    def _flush(self) -> None:
        fd = self._fd
        if fd is None:
            return  # not attached yet: the exec drains the queue once it starts
        try:
            while self._chunks:
                chunk = self._chunks[0]
                written = os.write(fd, chunk)
                self._pending -= written
                if written == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[written:]
        except BlockingIOError:
            self._watch(fd)
            return
        except BrokenPipeError:
            self.end("the command closed its stdin")
            return
        self._unwatch(fd)
        if self._closing:
            self._close_pipe()

    def _watch(self, fd: int) -> None:
        if not self._watching and self._loop is not None:
            self._loop.add_writer(fd, self._flush)
            self._watching = True

    def _unwatch(self, fd: int) -> None:
        if self._watching and self._loop is not None:
            self._loop.remove_writer(fd)
            self._watching = False

    def _close_pipe(self) -> None:
        fd = self._fd
        if fd is not None:
            self._unwatch(fd)
            self._fd = None
            os.close(fd)
