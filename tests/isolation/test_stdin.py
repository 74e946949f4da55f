"""Interactive stdin: a StdinFeed written while the command runs, its limits and its end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.isolation.backend import Backend
from actors.isolation.results import ExecResult, OutputChunk
from actors.isolation.sandbox import Sandbox
from actors.isolation.stdin_feed import MAX_PENDING_BYTES, StdinFeed
from cave.errors import InvalidArgumentError, LimitExceededError, SandboxStateError
from tests.isolation.conftest import async_test, open_sandbox, poll_until, run

# Waits for /workspace/go before reading stdin, so that the test decides when it is read.
GATED_WC = "while [ ! -e /workspace/go ]; do sleep 0.05; done; wc -c"


class Collected:
    """One exec consumed in the background: its stdout so far, then its result."""

    def __init__(self, sandbox: Sandbox, argv: list[str], feed: StdinFeed) -> None:
        self.stdout = bytearray()
        self.task = asyncio.ensure_future(self._consume(sandbox.exec(argv, stdin=feed)))

    async def _consume(self, items: AsyncIterator[OutputChunk | ExecResult]) -> ExecResult:
        async for item in items:
            if isinstance(item, ExecResult):
                return item
            if item.stream == "stdout":
                self.stdout.extend(item.data)
        raise AssertionError("the exec stream ended without a result")


@async_test
async def test_cat_echoes_each_line_as_it_is_written(backend: Backend) -> None:
    feed = StdinFeed()
    async with open_sandbox(backend) as sandbox:
        cat = Collected(sandbox, ["cat"], feed)
        feed.write(b"a\n")
        await poll_until(lambda: b"a" in cat.stdout, "cat echoing the first line")
        assert not cat.task.done()  # the command still runs, waiting for more
        feed.write(b"b\n")
        feed.close()
        result = await cat.task
    assert (bytes(cat.stdout), result.exit_code) == (b"a\nb\n", 0)


@async_test
async def test_writes_after_the_command_exits_are_refused(backend: Backend) -> None:
    feed = StdinFeed()
    async with open_sandbox(backend) as sandbox:
        head = Collected(sandbox, ["head", "-n1"], feed)
        feed.write(b"one\n")
        result = await head.task
    assert (bytes(head.stdout), result.exit_code) == (b"one\n", 0)
    with pytest.raises(SandboxStateError, match="ended"):
        feed.write(b"two\n")
    feed.close()  # closing what has ended is harmless


@async_test
async def test_an_exec_ends_without_reading_its_pending_stdin(backend: Backend) -> None:
    feed = StdinFeed()
    async with open_sandbox(backend) as sandbox:
        done = Collected(sandbox, ["true"], feed)
        feed.write(b"x" * MAX_PENDING_BYTES)  # more than the pipe holds, never read
        result = await done.task
    assert result.exit_code == 0
    assert feed.pending_bytes == 0  # dropped, not kept for nobody
    with pytest.raises(SandboxStateError):
        feed.write(b"late")


@async_test
async def test_writing_past_the_pending_cap_is_refused_and_loses_nothing(
    backend: Backend,
) -> None:
    feed = StdinFeed()
    chunk = b"y" * (64 << 10)
    accepted = 0
    async with open_sandbox(backend) as sandbox:
        wc = Collected(sandbox, ["sh", "-c", GATED_WC], feed)
        with pytest.raises(LimitExceededError):
            for _ in range(64):  # 4 MiB: far beyond the cap plus a pipe buffer
                feed.write(chunk)
                accepted += len(chunk)
                assert feed.pending_bytes <= MAX_PENDING_BYTES
        assert accepted >= MAX_PENDING_BYTES
        await sandbox.files.write("go", b"")  # the command reads now: the queue drains
        await poll_until(lambda: feed.pending_bytes == 0, "the queue draining into the pipe")
        feed.write(chunk)  # room again
        feed.close()
        result = await wc.task
    assert result.exit_code == 0
    assert int(wc.stdout) == accepted + len(chunk)  # the refused write left no partial bytes


@async_test
async def test_initial_bytes_and_close_before_the_exec_starts(backend: Backend) -> None:
    feed = StdinFeed(b"early\n")
    feed.write(b"queued\n")
    feed.close()
    with pytest.raises(SandboxStateError, match="closed"):
        feed.write(b"after close\n")
    async with open_sandbox(backend) as sandbox:
        out, _, result = await run(sandbox, ["cat"], stdin=feed)
        with pytest.raises(InvalidArgumentError, match="one exec"):
            await run(sandbox, ["cat"], stdin=feed)
    assert (out, result.exit_code) == (b"early\nqueued\n", 0)


@async_test
async def test_stdin_feed_takes_bytes_only(backend: Backend) -> None:
    with pytest.raises(InvalidArgumentError, match="stdin must be bytes"):
        StdinFeed("text")  # type: ignore[arg-type]
    feed = StdinFeed()
    with pytest.raises(InvalidArgumentError, match="stdin must be bytes"):
        feed.write("text")  # type: ignore[arg-type]
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidArgumentError, match="stdin must be bytes"):
            await run(sandbox, ["cat"], stdin="text")


@async_test
async def test_fixed_bytes_stdin_still_works(backend: Backend) -> None:
    payload = bytes(range(256)) * 1024  # larger than a pipe buffer
    async with open_sandbox(backend) as sandbox:
        out, _, result = await run(sandbox, ["cat"], stdin=payload)
    assert (out, result.exit_code) == (payload, 0)
