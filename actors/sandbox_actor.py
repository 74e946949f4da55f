"""SandboxActor: one Ray actor per sandbox, a thin shell around the plain `Sandbox` of isolation."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import ray

from actors.isolation.backend import Backend, select_backend
from actors.isolation.guarantees import Isolation
from actors.isolation.results import (
    ExecResult,
    ExecStarted,
    FileEntry,
    KeptOutput,
    OutputChunk,
)
from actors.isolation.sandbox import Sandbox
from actors.isolation.stdin_feed import StdinFeed
from actors.sandbox_ref import StaleTicketError
from cave.errors import InvalidArgumentError, SandboxError, SandboxStateError
from config.settings import IsolationSettings, SandboxLimits

if TYPE_CHECKING:
    from ray.actor import ActorHandle

SHELL = "/bin/sh"
log = logging.getLogger("cave.isolation")


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    state: str  # created | running | stopped | failed
    node_id: str
    backend: str
    limits: SandboxLimits | None
    created_at: float
    failure: str | None = None
    slot: str = ""  # names its cgroup and state directory on the node
    isolation: Isolation | None = None  # what the backend that runs it really gives


@dataclass(frozen=True)
class ExecOutput:
    stdout: bytes
    stderr: bytes
    result: ExecResult


@cache
def backend_for(settings: IsolationSettings) -> Backend:
    """This process's backend for these settings, probed once."""
    return select_backend(settings)


def command_argv(command: str | list[str]) -> list[str]:
    """A shell string runs under /bin/sh -c; a list is the argv itself."""
    if isinstance(command, str):
        if not command.strip():
            raise InvalidArgumentError("command must not be empty")
        return [SHELL, "-c", command]
    if not command or not all(isinstance(a, str) for a in command) or not command[0]:
        raise InvalidArgumentError("command must be a non-empty list of strings")
    return list(command)


class SandboxService:
    """Everything the actor does, without Ray, so that it is testable on its own.

    One actor runs many sandboxes, one after another: `stop` tears the sandbox down, forgets it
    and, in a pool's actor, hands the actor back to its pool, which prepares the next one.
    Every call on a sandbox carries the ticket it was started with (actors/sandbox_ref.py), so
    that a handle kept from an earlier incarnation reaches nothing."""

    def __init__(self, isolation: IsolationSettings, pool: ActorHandle | None = None) -> None:
        self._isolation = isolation
        self._pool = pool  # where a stopped sandbox's actor goes back to; None: it is not reused
        self._node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.incarnations = 0
        self._fresh()

    def _fresh(self) -> None:
        """A new, unstarted sandbox; nothing of the one before is kept."""
        self._sandbox = Sandbox(backend_for(self._isolation))
        self._id = self._sandbox.id  # replaced by the caller's id at start
        self._ticket: str | None = None
        self._created_at = time.time()
        self._feeds: dict[str, StdinFeed] = {}  # stdin of the interactive execs still running

    def _check(self, ticket: str) -> None:
        if self._ticket is None or not hmac.compare_digest(ticket, self._ticket):
            raise StaleTicketError("this sandbox is stopped")

    async def prepare(self, limits: SandboxLimits) -> None:
        """Build the next sandbox ahead of its start (a stopped one is forgotten first)."""
        if self._sandbox.state != "standby":
            if self._ticket is not None:
                raise SandboxStateError(f"sandbox {self._id} is running; stop it first")
            self._fresh()
        await self._sandbox.prepare(limits)

    async def start(self, sandbox_id: str, limits: SandboxLimits, ticket: str) -> SandboxInfo:
        if self._ticket is not None:
            raise SandboxStateError(f"this actor already runs sandbox {self._id}")
        self._id = sandbox_id
        self._created_at = time.time()
        await self._sandbox.start(limits)
        self._ticket = ticket
        self.incarnations += 1
        isolation = self._sandbox.backend.isolation
        if isolation.degraded:  # loud on every sandbox, not once per process
            log.warning(
                "sandbox %s runs with degraded isolation: %s", sandbox_id, isolation.describe()
            )
        return self._info()

    async def info(self, ticket: str) -> SandboxInfo:
        self._check(ticket)
        return self._info()

    def _info(self) -> SandboxInfo:
        sb = self._sandbox
        state = "created" if sb.state == "standby" else sb.state
        return SandboxInfo(
            self._id,
            state,
            self._node_id,
            sb.backend.name,
            sb.limits,
            self._created_at,
            sb.failure,
            sb.id,
            sb.backend.isolation,
        )

    async def exec(
        self,
        ticket: str,
        command: str | list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        interactive: bool = False,
    ) -> AsyncIterator[ExecStarted | OutputChunk | ExecResult]:
        """Output chunks, then the ExecResult; an interactive exec first yields ExecStarted.

        An interactive exec's stdin stays open after `stdin` (its first bytes, if given):
        `write_stdin` / `close_stdin` with the ExecStarted's id feed it while the command runs.
        """
        self._check(ticket)
        if interactive:
            async for event in self._interactive(command, env, cwd, stdin, timeout_s):
                yield event
            return
        async for item in self._sandbox.exec(
            command_argv(command), env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        ):
            yield item

    async def _interactive(
        self,
        command: str | list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
        timeout_s: float | None,
    ) -> AsyncIterator[ExecStarted | OutputChunk | ExecResult]:
        argv = command_argv(command)
        feed = StdinFeed(b"" if stdin is None else stdin)
        exec_id = uuid.uuid4().hex
        self._feeds[exec_id] = feed
        try:
            yield ExecStarted(exec_id)
            async for item in self._sandbox.exec(
                argv, env=env, cwd=cwd, stdin=feed, timeout_s=timeout_s
            ):
                if isinstance(item, ExecResult):  # finished before anyone hears of it
                    del self._feeds[exec_id]
                yield item
        finally:
            self._feeds.pop(exec_id, None)

    # async, though they never await: Ray runs them on the actor's event loop, the only thread
    # that may touch a feed, alongside the streaming exec.
    async def write_stdin(self, ticket: str, exec_id: str, data: bytes) -> None:
        """Queue bytes for a running interactive exec; LimitExceededError when too much waits."""
        self._check(ticket)
        self._feed(exec_id).write(data)

    async def close_stdin(self, ticket: str, exec_id: str) -> None:
        """End of input for a running interactive exec, once what was written is read."""
        self._check(ticket)
        self._feed(exec_id).close()

    def _feed(self, exec_id: str) -> StdinFeed:
        feed = self._feeds.get(exec_id)
        if feed is None:
            raise SandboxStateError(f"no running interactive exec {exec_id!r} in {self._id}")
        return feed

    async def run(
        self,
        ticket: str,
        command: str | list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        inline_bytes: int | None = None,
    ) -> ExecOutput:
        """Run to completion in one call: cheaper than the stream when output is not needed live.
        `inline_bytes`: keep at most this much of each stream (the API's inline cap), here, so
        that the rest never crosses Ray; the result says `truncated` then."""
        self._check(ticket)
        kept = KeptOutput(inline_bytes)
        async for item in self._sandbox.exec(
            command_argv(command), env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        ):
            if isinstance(item, ExecResult):
                return ExecOutput(*kept.finish(item))
            kept.add(item)
        raise SandboxError("the exec ended without a result")

    async def write_file(self, ticket: str, path: str, data: bytes) -> int:
        self._check(ticket)
        return await self._sandbox.files.write(path, data)

    async def read_file(self, ticket: str, path: str) -> bytes:
        self._check(ticket)
        return await self._sandbox.files.read(path)

    async def list_files(self, ticket: str, path: str = "") -> list[FileEntry]:
        self._check(ticket)
        return await self._sandbox.files.list(path)

    async def delete_file(self, ticket: str, path: str, recursive: bool = False) -> None:
        self._check(ticket)
        await self._sandbox.files.delete(path, recursive)

    async def stop(self, ticket: str) -> SandboxInfo:
        """Tear the sandbox down (processes, cgroup, mounts, workspace) and forget it; a pool's
        actor then goes back to its pool, to be prepared for another sandbox."""
        self._check(ticket)
        self._ticket = None  # from here on, no call of the stopped sandbox gets through
        sandbox_id = self._id
        await self._sandbox.stop()
        info = self._info()
        self._fresh()
        if self._pool is not None:
            me = ray.get_runtime_context().current_actor
            self._pool.recycle.remote(sandbox_id, me, self.incarnations)
        return info

    async def discard(self) -> None:
        """Tear down a sandbox that was never started (a spare's); used before the actor is
        killed. A running sandbox is stopped only with its ticket."""
        if self._ticket is not None:
            raise SandboxStateError(f"sandbox {self._id} is running; stop it with its ticket")
        await self._sandbox.stop()


# The Ray shell is the plain class itself: every public method becomes an actor method (exec a
# streaming generator), while SandboxService stays testable without Ray.
SandboxActor = ray.remote(num_cpus=0, max_restarts=0)(SandboxService)
