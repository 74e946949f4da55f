"""SandboxActor: a Ray actor hosting sandboxes of its node (plain `Sandbox`s of isolation)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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


@dataclass
class _Hosted:
    """One running sandbox of a host: what its calls need besides the Sandbox itself."""

    id: str
    sandbox: Sandbox
    created_at: float
    feeds: dict[str, StdinFeed] = field(default_factory=dict)  # interactive execs' stdin


class SandboxService:
    """Hosts sandboxes of one node: everything the actor does, without Ray, testable alone.

    A sandbox's own processes (keeper, zygote, commands) run apart from this process; what is
    here is their control: the channels, cgroup, state. One host controls many sandboxes, so
    that a sandbox costs no Ray worker of its own (about 55 MiB, a CPU-second to start, and
    a 10 ms timer that keeps waking it): a node's pool keeps a few hosts
    (`CAVE_POOL_HOSTS`) and prepares spare sandboxes in them (docs/sandboxes.md).

    Every call on a sandbox carries the ticket it was started with (actors/sandbox_ref.py); the
    ticket finds it here, and a stopped sandbox's ticket reaches nothing."""

    def __init__(self, isolation: IsolationSettings, pool: ActorHandle | None = None) -> None:
        self._isolation = isolation
        backend_for(isolation)  # a node that refuses to isolate refuses the host at its start
        self._pool = pool  # told of each stop, to prepare the next spare; None: no pool
        self._node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self._standby: list[Sandbox] = []  # prepared, waiting for a start
        # By ticket: a random secret, so a lookup is its check (a dict compares hashes first,
        # and the ticket is no boundary against a Ray driver anyway: docs/security.md).
        self._running: dict[str, _Hosted] = {}

    def _get(self, ticket: str) -> _Hosted:
        hosted = self._running.get(ticket) if isinstance(ticket, str) else None
        if hosted is None:
            raise StaleTicketError("this sandbox is stopped")
        return hosted

    def load(self) -> dict[str, int]:
        return {"standby": len(self._standby), "running": len(self._running)}

    async def prepare(self, limits: SandboxLimits) -> None:
        """Build one more sandbox ahead of its start."""
        sandbox = Sandbox(backend_for(self._isolation))
        await sandbox.prepare(limits)  # tears itself down when it fails
        self._standby.append(sandbox)

    async def start(self, sandbox_id: str, limits: SandboxLimits, ticket: str) -> SandboxInfo:
        """Start a prepared sandbox (or build one now) as `sandbox_id`, reached by `ticket`."""
        if ticket in self._running:
            raise SandboxStateError("this ticket already names a running sandbox")
        sandbox = self._standby.pop() if self._standby else Sandbox(backend_for(self._isolation))
        try:
            await sandbox.start(limits)
        except BaseException:
            await sandbox.stop()
            raise
        hosted = _Hosted(sandbox_id, sandbox, time.time())
        self._running[ticket] = hosted
        isolation = sandbox.backend.isolation
        if isolation.degraded:  # loud on every sandbox, not once per process
            log.warning(
                "sandbox %s runs with degraded isolation: %s", sandbox_id, isolation.describe()
            )
        return self._info(hosted)

    async def ping(self, ticket: str) -> None:
        """Answers while this sandbox runs here; StaleTicketError once it stopped."""
        self._get(ticket)

    async def info(self, ticket: str) -> SandboxInfo:
        return self._info(self._get(ticket))

    def _info(self, hosted: _Hosted) -> SandboxInfo:
        sb = hosted.sandbox
        state = "created" if sb.state == "standby" else sb.state
        return SandboxInfo(
            hosted.id,
            state,
            self._node_id,
            sb.backend.name,
            sb.limits,
            hosted.created_at,
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
        hosted = self._get(ticket)
        if interactive:
            async for event in self._interactive(hosted, command, env, cwd, stdin, timeout_s):
                yield event
            return
        async for item in hosted.sandbox.exec(
            command_argv(command), env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        ):
            yield item

    async def _interactive(
        self,
        hosted: _Hosted,
        command: str | list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
        timeout_s: float | None,
    ) -> AsyncIterator[ExecStarted | OutputChunk | ExecResult]:
        argv = command_argv(command)
        feed = StdinFeed(b"" if stdin is None else stdin)
        exec_id = uuid.uuid4().hex
        hosted.feeds[exec_id] = feed
        try:
            yield ExecStarted(exec_id)
            async for item in hosted.sandbox.exec(
                argv, env=env, cwd=cwd, stdin=feed, timeout_s=timeout_s
            ):
                if isinstance(item, ExecResult):  # finished before anyone hears of it
                    del hosted.feeds[exec_id]
                yield item
        finally:
            hosted.feeds.pop(exec_id, None)

    # async, though they never await: Ray runs them on the actor's event loop, the only thread
    # that may touch a feed, alongside the streaming exec.
    async def write_stdin(self, ticket: str, exec_id: str, data: bytes) -> None:
        """Queue bytes for a running interactive exec; LimitExceededError when too much waits."""
        self._feed(self._get(ticket), exec_id).write(data)

    async def close_stdin(self, ticket: str, exec_id: str) -> None:
        """End of input for a running interactive exec, once what was written is read."""
        self._feed(self._get(ticket), exec_id).close()

    def _feed(self, hosted: _Hosted, exec_id: str) -> StdinFeed:
        feed = hosted.feeds.get(exec_id)
        if feed is None:
            raise SandboxStateError(f"no running interactive exec {exec_id!r} in {hosted.id}")
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
        sandbox = self._get(ticket).sandbox
        kept = KeptOutput(inline_bytes)
        async for item in sandbox.exec(
            command_argv(command), env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        ):
            if isinstance(item, ExecResult):
                return ExecOutput(*kept.finish(item))
            kept.add(item)
        raise SandboxError("the exec ended without a result")

    async def write_file(self, ticket: str, path: str, data: bytes) -> int:
        return await self._get(ticket).sandbox.files.write(path, data)

    async def read_file(self, ticket: str, path: str) -> bytes:
        return await self._get(ticket).sandbox.files.read(path)

    async def list_files(self, ticket: str, path: str = "") -> list[FileEntry]:
        return await self._get(ticket).sandbox.files.list(path)

    async def delete_file(self, ticket: str, path: str, recursive: bool = False) -> None:
        await self._get(ticket).sandbox.files.delete(path, recursive)

    async def stop(self, ticket: str) -> SandboxInfo:
        """Tear the sandbox down (processes, cgroup, mounts, workspace) and forget it; the pool
        hears of it, to prepare the next spare."""
        hosted = self._get(ticket)
        del self._running[ticket]  # from here on, no call of the stopped sandbox gets through
        hosted.feeds.clear()
        await hosted.sandbox.stop()
        info = self._info(hosted)
        if self._pool is not None:
            self._pool.recycle.remote(hosted.id)
        return info

    async def discard(self) -> bool:
        """Tear down one prepared, never started sandbox (a spare the pool no longer wants);
        False when none waits here."""
        if not self._standby:
            return False
        await self._standby.pop().stop()
        return True

    async def shutdown(self) -> None:
        """Tear down every sandbox here, running or not (a node's drain, a retired host)."""
        doomed = [h.sandbox for h in self._running.values()] + self._standby
        self._running.clear()
        self._standby = []
        for sandbox in doomed:
            await sandbox.stop()


# The Ray shell is the plain class itself: every public method becomes an actor method (exec a
# streaming generator), while SandboxService stays testable without Ray. Its concurrency bounds
# the calls in flight over all its sandboxes (a streaming exec holds one while it runs): the
# pool starts hosts with MAX_CALLS, over Ray's 1,000 for an async actor.
MAX_CALLS = 10_000
SandboxActor = ray.remote(num_cpus=0, max_restarts=0)(SandboxService)
