"""One exec from the host side: pipes to the zygote, output read as it comes, capped per stream."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from actors.isolation.aio import wait_writable
from actors.isolation.channel import Channel
from actors.isolation.results import ExecResult, OutputChunk
from actors.isolation.stdin_feed import StdinFeed
from cave.errors import InvalidArgumentError, QuotaExceededError, SandboxError

READ_BYTES = 65536
EAGAIN = 11


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    stdin: bytes | StdinFeed | None
    timeout_s: float
    output_bytes: int


class _Stream:
    """Reads one pipe; keeps what fits under the cap, counts the rest, never blocks the writer."""

    def __init__(self, name: str, fd: int, cap: int, queue: asyncio.Queue[OutputChunk | None]):
        self.name, self.fd, self.cap, self.queue = name, fd, cap, queue
        self.total = 0
        self.eof = asyncio.get_running_loop().create_future()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.close()
            return
        kept = data[: max(0, self.cap - self.total)]
        self.total += len(data)
        if kept:
            self.queue.put_nowait(OutputChunk(self.name, kept))

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def close(self) -> None:
        if not self.eof.done():
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.eof.set_result(None)
            self.queue.put_nowait(None)


def check_request(req: ExecRequest) -> None:
    """Refuse what posix_spawn would choke on, before touching the sandbox (size: at send)."""
    if not req.argv or not all(isinstance(a, str) and "\0" not in a for a in req.argv):
        raise InvalidArgumentError("argv must be a non-empty list of strings without NUL bytes")
    if not req.argv[0]:
        raise InvalidArgumentError("argv[0] must not be empty")
    if req.stdin is not None and not isinstance(req.stdin, bytes | StdinFeed):
        raise InvalidArgumentError(
            f"stdin must be bytes or a StdinFeed, got {type(req.stdin).__name__}"
        )
    if not isinstance(req.env, dict):
        raise InvalidArgumentError("env must be a mapping of strings to strings")
    if req.cwd is not None and (not isinstance(req.cwd, str) or "\0" in req.cwd):
        raise InvalidArgumentError("cwd must be a path string without NUL bytes")
    for key, value in req.env.items():
        if (
            not (isinstance(key, str) and isinstance(value, str))
            or not key
            or "=" in key
            or "\0" in key + value
        ):
            raise InvalidArgumentError(
                f"bad environment variable {key!r}: names must be "
                "non-empty without '=', values strings, no NUL bytes"
            )


async def run_exec(
    channel: Channel, req: ExecRequest, oom_count: Callable[[], int]
) -> AsyncIterator[OutputChunk | ExecResult]:
    check_request(req)
    feed = req.stdin if isinstance(req.stdin, StdinFeed) else None
    if feed is not None:
        feed.claim()
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    exec_id = channel.next_id()
    exited = channel.expect(exec_id)
    ooms_before = oom_count()
    started = time.monotonic()
    message = {
        "op": "exec",
        "id": exec_id,
        "argv": req.argv,
        "env": req.env,
        "cwd": req.cwd,
        "timeout_s": req.timeout_s,
    }
    try:
        await channel.send(message, [stdin_r, out_w, err_w])
    except BaseException:  # never sent (too large, sandbox gone): nothing will answer or read
        channel.forget(exec_id)
        for fd in (stdin_w, out_r, err_r):
            os.close(fd)
        if feed is not None:
            feed.end("the exec did not start")
        raise
    finally:
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
    queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue()
    streams = [
        _Stream("stdout", out_r, req.output_bytes, queue),
        _Stream("stderr", err_r, req.output_bytes, queue),
    ]
    feeder = _start_stdin(stdin_w, req.stdin)
    try:
        open_streams = len(streams)
        while open_streams:
            chunk = await queue.get()
            if chunk is None:
                open_streams -= 1
            else:
                yield chunk
        reply, _ = await exited
    finally:
        if feeder is not None:
            feeder.cancel()
        if feed is not None:  # now, before the result: whoever sees it can no longer write
            feed.end("the exec has ended")
        for stream in streams:
            stream.close()
    yield _result(reply, streams, started, ooms_before, oom_count())


def _result(
    reply: dict, streams: list[_Stream], started: float, ooms_before: int, ooms_after: int
) -> ExecResult:
    if "error" in reply:
        if reply.get("errno") == EAGAIN:
            raise QuotaExceededError(
                f"cannot start the command: {reply['error']} "
                "(the sandbox's process limit is reached)"
            )
        if reply.get("errno") == 2 or reply.get("kind") == "invalid_argument":
            raise InvalidArgumentError(str(reply["error"]))
        raise SandboxError(f"cannot start the command: {reply['error']}")
    code = int(reply["exit_code"])
    return ExecResult(
        exit_code=code,
        duration_ms=(time.monotonic() - started) * 1000,
        timed_out=bool(reply["timed_out"]),
        oom_killed=code == 137 and ooms_after > ooms_before,
        truncated=any(s.truncated for s in streams),
        stdout_bytes=streams[0].total,
        stderr_bytes=streams[1].total,
    )


def _start_stdin(fd: int, stdin: bytes | StdinFeed | None) -> asyncio.Future[None] | None:
    """Hand the pipe to the feed (None), or start writing fixed bytes in a task."""
    if isinstance(stdin, StdinFeed):
        stdin.attach(fd)
        return None
    return asyncio.ensure_future(_feed_stdin(fd, stdin))


async def _feed_stdin(fd: int, data: bytes | None) -> None:
    """Write stdin without blocking the actor; a command that never reads it just never gets it."""
    try:
        if data:
            os.set_blocking(fd, False)
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await wait_writable(fd)
    except (BrokenPipeError, asyncio.CancelledError):
        pass
    finally:
        os.close(fd)
