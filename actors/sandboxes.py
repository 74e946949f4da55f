"""The sandbox lifecycle for drivers and sync actors (`cave sandbox run`, benches, notebooks):
the calls of actors/remote.py, which holds the one implementation, run to completion here."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import ray

from actors import remote
from actors.directory import DIRECTORY_NAME
from actors.handles import choose_node, directory, translated, warm_pool
from actors.isolation.results import ExecResult, ExecStarted, OutputChunk
from actors.placement import DEFAULT_POOL
from actors.sandbox_actor import ExecOutput, SandboxInfo
from actors.sandbox_ref import SandboxRef
from actors.warm_pool import NAMESPACE
from cave.errors import SandboxError, SandboxNotFoundError
from config.settings import LimitOverrides, Settings, resolve_limits

__all__ = [  # the driver's API; the handles are here too, for callers that place sandboxes
    "SandboxHandle",
    "choose_node",
    "create_sandbox",
    "directory",
    "get_sandbox",
    "stop_all",
    "stop_sandbox",
    "warm_pool",
]

T = TypeVar("T")


def _blocking(call: Coroutine[Any, Any, T]) -> T:
    """Run one of remote's coroutines to its end. Inside a running event loop (an async actor,
    a notebook) it runs on a thread of its own: this thread's loop must not be blocked on."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, call).result()


def _get(ref: Any) -> Any:
    """ray.get with its result typed Any: Ray's stubs can't say what a remote method returns."""
    return ray.get(ref)


@dataclass
class SandboxHandle:
    """A started sandbox, from a driver or another actor: sync helpers over the actor handle."""

    id: str
    node_id: str
    actor: SandboxRef

    def exec_stream(
        self, command: str | list[str], **kwargs: object
    ) -> Iterator[OutputChunk | ExecResult]:
        """Output chunks as the command writes them, then the ExecResult."""
        return self._items(command, **kwargs)

    def exec_interactive(
        self, command: str | list[str], **kwargs: object
    ) -> tuple[str, Iterator[OutputChunk | ExecResult]]:
        """Start a command whose stdin stays open: its exec id, for `write_stdin` and
        `close_stdin` while it runs, and its items as `exec_stream` yields them."""
        items = self._items(command, interactive=True, **kwargs)
        started = next(items)
        if not isinstance(started, ExecStarted):
            raise SandboxError(f"sandbox {self.id}: an interactive exec began with {started!r}")
        return started.exec_id, items

    def _items(self, command: str | list[str], **kwargs: object) -> Iterator[Any]:
        # Items one by one as the actor yields them: the sync twin of remote.stream.
        with translated(self.id):
            refs: Iterator[Any] = self.actor.exec.remote(command, **kwargs)
            for ref in refs:
                yield _get(ref)

    def write_stdin(self, exec_id: str, data: bytes) -> None:
        """Queue stdin for a running interactive exec (LimitExceededError past 1 MiB unread)."""
        with translated(self.id):
            _get(self.actor.write_stdin.remote(exec_id, data))

    def close_stdin(self, exec_id: str) -> None:
        with translated(self.id):
            _get(self.actor.close_stdin.remote(exec_id))

    def run(self, command: str | list[str], **kwargs: object) -> ExecOutput:
        """Run to completion in one actor call (a plain ray.get: an exec is a driver's hot path,
        no event loop is started for it)."""
        with translated(self.id):
            output: ExecOutput = _get(self.actor.run.remote(command, **kwargs))
            return output

    def info(self) -> SandboxInfo:
        with translated(self.id):
            info: SandboxInfo = _get(self.actor.info.remote())
            return info

    def stop(self) -> SandboxInfo:
        """Stop the sandbox; its actor goes back to its node's pool (this handle then reaches
        nothing: StaleTicketError)."""
        info = _blocking(remote.stop(self.id, self.actor))
        if info is None:
            raise SandboxNotFoundError(f"sandbox {self.id} is stopped or unknown")
        return info


def create_sandbox(
    settings: Settings,
    overrides: LimitOverrides | None = None,
    node_id: str | None = None,
    sandbox_id: str | None = None,
    pool: str = DEFAULT_POOL,
) -> SandboxHandle:
    """A started sandbox on the least loaded node of `pool` (CapacityError when all are full),
    or on `node_id` when one is named."""
    limits = resolve_limits(overrides, settings)  # bad limits fail before any actor is touched
    sandbox_id = sandbox_id or uuid.uuid4().hex
    actor, info = _blocking(remote.create(sandbox_id, limits, settings, node_id, pool))
    return SandboxHandle(sandbox_id, info.node_id, actor)


def get_sandbox(sandbox_id: str) -> SandboxHandle:
    with translated(sandbox_id):
        entry: tuple[SandboxRef, str] = _get(directory().lookup.remote(sandbox_id))
    actor, node = entry
    return SandboxHandle(sandbox_id, node, actor)


def stop_sandbox(sandbox_id: str) -> SandboxInfo:
    """Stop the sandbox and release everything it held; its actor goes back to the pool."""
    info = _blocking(remote.stop(sandbox_id, None))
    if info is None:
        raise SandboxNotFoundError(f"sandbox {sandbox_id} is stopped or unknown")
    return info


def stop_all(timeout_s: float = 30.0) -> list[str]:
    """Discard every pool's spares and stop every registered sandbox of this cluster.

    Call it before shutting a cluster down: sandboxes whose actors just die leave their empty
    cgroups and directories for a later sweep. Best effort; returns what could not be done.
    """
    problems: list[str] = []
    names = ray.util.list_named_actors()
    pools = [ray.get_actor(n, namespace=NAMESPACE) for n in names if n.startswith("cave-pool-")]
    try:
        ray.get([pool.drain.remote() for pool in pools], timeout=timeout_s)
    except Exception as exc:  # an unreachable pool must not keep the rest from stopping
        problems.append(f"draining pools: {exc}")
    if DIRECTORY_NAME not in names:
        return problems
    ids: list[str] = _get(directory().ids.remote())
    for sandbox_id in ids:
        try:
            stop_sandbox(sandbox_id)
        except Exception as exc:
            problems.append(f"stopping {sandbox_id}: {exc}")
    return problems
