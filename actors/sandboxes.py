"""Ray-side sandbox lifecycle for code in the cluster: create (warm pool), find, exec, stop."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from actors.directory import DIRECTORY_NAME, SandboxDirectory
from actors.isolation.results import ExecResult, ExecStarted, OutputChunk
from actors.placement import DEFAULT_POOL
from actors.sandbox_actor import ExecOutput, SandboxInfo
from actors.warm_pool import NAMESPACE, WarmPool, pinned, pool_name
from cave.errors import CapacityError, SandboxError, SandboxStateError
from config.settings import LimitOverrides, Settings, resolve_limits


def _get(ref: Any) -> Any:
    """ray.get with its result typed Any: Ray's stubs can't say what a remote method returns."""
    return ray.get(ref)


@contextmanager
def _translated(sandbox_id: str) -> Iterator[None]:
    """Ray's actor-death errors become ours at this boundary; CaveErrors pass through."""
    try:
        yield
    except RayActorError as exc:
        raise SandboxStateError(f"sandbox {sandbox_id} is stopped or lost") from exc


def _cluster() -> str:
    """Handles are cached per cluster: a driver may shut Ray down and connect to another."""
    return str(ray.get_runtime_context().gcs_address)


def directory() -> ActorHandle:
    return _directory_of(_cluster())


@cache
def _directory_of(cluster: str) -> ActorHandle:
    # cast: Ray's stubs type `.remote()` on an actor class as handle-or-class.
    return cast(
        ActorHandle,
        SandboxDirectory.options(
            name=DIRECTORY_NAME,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
        ).remote(),
    )


def warm_pool(node_id: str, settings: Settings) -> ActorHandle:
    """The node's pool, created with these settings by whoever asks first."""
    return _pool_of(_cluster(), node_id, settings)


@cache
def _pool_of(cluster: str, node_id: str, settings: Settings) -> ActorHandle:
    return cast(
        ActorHandle,
        WarmPool.options(
            name=pool_name(node_id),
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            **pinned(node_id),
        ).remote(node_id, settings.isolation, settings.defaults, settings.pool.size_per_node),
    )


def choose_node(node_id: str | None = None) -> str:
    """The given node if alive, else this driver's node when alive, else the first alive node."""
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if node_id is not None:
        if node_id not in alive:
            raise CapacityError(f"node {node_id} is not an alive node of this cluster")
        return node_id
    here = ray.get_runtime_context().get_node_id()
    if here in alive:
        return here
    if not alive:
        raise CapacityError("the cluster has no alive node")
    return alive[0]


@dataclass
class SandboxHandle:
    """A started sandbox, from a driver or another actor: sync helpers over the actor handle."""

    id: str
    node_id: str
    actor: ActorHandle

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
        with _translated(self.id):
            refs: Iterator[Any] = self.actor.exec.remote(command, **kwargs)
            for ref in refs:
                yield _get(ref)

    def write_stdin(self, exec_id: str, data: bytes) -> None:
        """Queue stdin for a running interactive exec (LimitExceededError past 1 MiB unread)."""
        with _translated(self.id):
            _get(self.actor.write_stdin.remote(exec_id, data))

    def close_stdin(self, exec_id: str) -> None:
        with _translated(self.id):
            _get(self.actor.close_stdin.remote(exec_id))

    def run(self, command: str | list[str], **kwargs: object) -> ExecOutput:
        """Run to completion in one actor call."""
        with _translated(self.id):
            output: ExecOutput = _get(self.actor.run.remote(command, **kwargs))
            return output

    def info(self) -> SandboxInfo:
        with _translated(self.id):
            info: SandboxInfo = _get(self.actor.info.remote())
            return info

    def stop(self) -> SandboxInfo:
        return stop_sandbox(self.id)


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
    if node_id is None:
        node: str | None = _get(
            directory().reserve.remote(sandbox_id, pool, settings.placement.max_per_node)
        )
        if node is None:
            raise CapacityError(f"no node of pool {pool!r} has room for another sandbox")
    else:
        node = choose_node(node_id)
    try:
        created: tuple[ActorHandle, SandboxInfo] = _get(
            warm_pool(node, settings).create.remote(sandbox_id, limits, directory())
        )
    except BaseException:
        _get(directory().release.remote(sandbox_id))
        raise
    return SandboxHandle(sandbox_id, node, created[0])


def get_sandbox(sandbox_id: str) -> SandboxHandle:
    entry: tuple[ActorHandle, str] = _get(directory().lookup.remote(sandbox_id))
    actor, node = entry
    return SandboxHandle(sandbox_id, node, actor)


def stop_sandbox(sandbox_id: str) -> SandboxInfo:
    """Stop the sandbox, release everything it held, and end its actor."""
    handle = get_sandbox(sandbox_id)
    try:
        info: SandboxInfo = _get(handle.actor.stop.remote())
    finally:
        _get(directory().remove.remote(sandbox_id))
        ray.kill(handle.actor)
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
