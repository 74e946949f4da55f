"""The sandbox lifecycle, written once: reserve a node, create from its warm pool, find, run,
stop. Async, for code in an event loop (API replicas); actors/sandboxes.py is the same calls for
drivers and sync actors. No ray.get here: Ray errors are mapped (actors/handles.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError

from actors.handles import choose_node, directory, translated, warm_pool
from actors.isolation.guarantees import Isolation
from actors.isolation.results import ExecResult, OutputChunk
from actors.placement import DEFAULT_POOL, Capacity, SandboxNode
from actors.sandbox_actor import ExecOutput, SandboxInfo
from actors.sandbox_ref import SandboxRef, StaleTicketError
from cave.errors import (
    CapacityError,
    CaveError,
    SandboxError,
    SandboxNotFoundError,
    SandboxStateError,
)
from config.settings import SandboxLimits, Settings

log = logging.getLogger("cave.sandboxes")

T = TypeVar("T")
PROBE_TIMEOUT_S = 5.0
WAIT_POLL_S = 0.25  # how often a create waiting for room asks again


def capacity(settings: Settings) -> Capacity:
    """How many sandboxes a node that declares none takes, by these settings."""
    return Capacity(
        settings.placement.max_per_node,
        settings.defaults.memory_bytes,
        settings.placement.memory_overcommit,
    )


async def call(sandbox_id: str, ref: Awaitable[T]) -> T:
    with translated(sandbox_id):
        return await ref


async def reserve(
    sandbox_id: str,
    settings: Settings,
    pool: str = DEFAULT_POOL,
    wait_s: float = 0.0,
    memory_bytes: int = 0,
) -> str:
    """A node with room for this sandbox, held for it until it registers. When the pool is full
    the create fails at once (CapacityError), or with `wait_s` asks again until then while the
    autoscaler is told that a sandbox waits for room."""
    deadline = time.monotonic() + wait_s
    places = directory()
    try:
        while True:
            node: str | None = await call(
                sandbox_id,
                places.reserve.remote(
                    sandbox_id,
                    pool,
                    capacity(settings),
                    wait_s > 0,
                    memory_bytes,
                    settings.placement.memory_overcommit,
                ),
            )
            if node is not None:
                return node
            if time.monotonic() >= deadline:
                waited = f" within {wait_s:g} s" if wait_s > 0 else ""
                raise CapacityError(
                    f"no node of pool {pool!r} has room for another sandbox{waited}; "
                    "stop a sandbox, add a node, or ask to wait (wait_s)"
                )
            await asyncio.sleep(WAIT_POLL_S)
    except BaseException:
        # Given up, failed, or cancelled (the client went away): the directory stops counting
        # this create as waiting. Sent, not awaited: a cancelled task must not wait again.
        places.release.remote(sandbox_id)
        raise


async def create(
    sandbox_id: str,
    limits: SandboxLimits,
    settings: Settings,
    node_id: str | None = None,
    pool: str = DEFAULT_POOL,
    wait_s: float = 0.0,
    reserved: bool = False,
) -> tuple[SandboxRef, SandboxInfo]:
    """A started sandbox from its node's warm pool, registered in the directory. `node_id`
    (a node asked for by name, or one `reserve` gave: `reserved`) skips placement."""
    if node_id is None:
        node = await reserve(sandbox_id, settings, pool, wait_s)
    elif reserved:
        node = node_id  # the directory placed it there a moment ago, alive
    else:
        node = await asyncio.to_thread(choose_node, node_id)  # ray.nodes(): a blocking GCS call
    try:
        warm = await asyncio.to_thread(warm_pool, node, settings)
        created: tuple[SandboxRef, SandboxInfo] = await call(
            sandbox_id, warm.create.remote(sandbox_id, limits, directory())
        )
    except BaseException:
        directory().release.remote(sandbox_id)  # sent, not awaited: see reserve
        raise
    return created


async def release(sandbox_id: str) -> None:
    """Give back a node reserved for a sandbox that will not start."""
    await directory().release.remote(sandbox_id)


async def ensure_pools(settings: Settings) -> int:
    """Start the warm pool of every sandbox node that has none yet; returns how many nodes."""
    nodes: list[SandboxNode] = await directory().nodes.remote(capacity(settings))
    for node in nodes:
        await asyncio.to_thread(warm_pool, node.node_id, settings)  # cached after the first
    return len(nodes)


async def isolation_by_node(settings: Settings) -> dict[str, Isolation | CaveError]:
    """What each sandbox node's warm pool gives its sandboxes, or why it refuses to start any
    (IsolationUnavailableError under CAVE_ENV=production); pools are started where missing."""
    nodes: list[SandboxNode] = await directory().nodes.remote(capacity(settings))
    pools = [await asyncio.to_thread(warm_pool, n.node_id, settings) for n in nodes]
    reports = await asyncio.gather(
        *(
            call(f"pool of {n.node_id}", pool.isolation_report.remote())
            for n, pool in zip(nodes, pools, strict=True)
        ),
        return_exceptions=True,
    )
    found: dict[str, Isolation | CaveError] = {}
    for node, report in zip(nodes, reports, strict=True):
        if isinstance(report, BaseException) and not isinstance(report, CaveError):
            raise report
        found[node.node_id] = report
    return found


async def node_load(settings: Settings) -> list[tuple[str, str, int, int]]:
    """Each sandbox node's (id, pool, sandboxes placed, capacity)."""
    load: list[tuple[str, str, int, int]] = await directory().placement.remote(capacity(settings))
    return load


async def on_dead_nodes() -> list[str]:
    """The registered sandboxes whose nodes are gone."""
    ids: list[str] = await directory().on_dead_nodes.remote()
    return ids


async def lookup(sandbox_id: str) -> SandboxRef | None:
    """The sandbox's actor, or None when the directory does not know it."""
    try:
        entry: tuple[SandboxRef, str] = await call(
            sandbox_id, directory().lookup.remote(sandbox_id)
        )
    except SandboxNotFoundError:
        return None
    return entry[0]


async def known_ids() -> set[str]:
    ids: list[str] = await directory().ids.remote()
    return set(ids)


async def dead_ids(sandbox_ids: Iterable[str], timeout_s: float = PROBE_TIMEOUT_S) -> set[str]:
    """Those of these sandboxes that the directory does not know or whose actors Ray reports
    dead (killed, crashed, node gone). A slow or briefly unreachable actor is not dead.
    The directory is asked for the actors, not a cache: another replica may have restarted one."""
    wanted = sorted(set(sandbox_ids))
    actors: dict[str, SandboxRef] = await directory().actors.remote(wanted)
    probed = sorted(actors)
    dead = await asyncio.gather(*(_is_dead(actors[sid], timeout_s) for sid in probed))
    return (set(wanted) - set(actors)) | {
        sid for sid, gone in zip(probed, dead, strict=True) if gone
    }


async def _is_dead(actor: SandboxRef, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(actor.ready(), timeout_s)
    except ActorUnavailableError:
        return False  # unreachable for now (a network blip, a restarting node): ask again later
    except (RayActorError, StaleTicketError):  # its host died, or the sandbox was stopped
        return True
    except TimeoutError:
        return False
    return False


async def forget(sandbox_id: str) -> None:
    """Drop a dead sandbox's directory entry, so that nothing tries its actor again."""
    await directory().remove.remote(sandbox_id)


async def stop(sandbox_id: str, actor: SandboxRef | None) -> SandboxInfo | None:
    """Stop the sandbox (its host tears it down and tells its pool). None when it was
    already gone.

    `actor` may be a stale handle (a replica's cache) of an earlier incarnation of this id, which
    was stopped and started again elsewhere: the directory's current one is stopped then."""
    info: SandboxInfo | None = None
    tried: list[str] = []
    ref = actor or await lookup(sandbox_id)
    while ref is not None and ref.ticket not in tried:
        tried.append(ref.ticket)
        try:
            info = await call(sandbox_id, ref.stop.remote())
            break
        except StaleTicketError:
            pass  # stopped through another handle: its actor may serve another sandbox by now
        except (SandboxStateError, SandboxError):
            # Its host died, or the teardown failed: either way the host has forgotten it (a
            # host also runs other sandboxes: never ended for one's sake).
            log.warning("stopping sandbox %s failed", sandbox_id, exc_info=True)
        ref = await lookup(sandbox_id)
    if tried:
        await directory().remove.remote(sandbox_id, tuple(tried))
    return info


async def run(actor: SandboxRef, sandbox_id: str, argv: Any, **kwargs: Any) -> ExecOutput:
    output: ExecOutput = await call(sandbox_id, actor.run.remote(argv, **kwargs))
    return output


async def stream(
    actor: SandboxRef, sandbox_id: str, argv: Any, **kwargs: Any
) -> AsyncIterator[Any]:
    """The exec's items as they come: OutputChunks, then the ExecResult (or an exec id first
    when interactive)."""
    with translated(sandbox_id):
        refs: Any = actor.exec.remote(argv, **kwargs)
        async for ref in refs:
            item: OutputChunk | ExecResult | Any = await ref
            yield item
