"""Async sandbox calls for code in an event loop (API replicas): no ray.get, Ray errors mapped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ray
from ray.actor import ActorHandle
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RaySystemError,
    RayTaskError,
)

from actors.isolation.results import ExecResult, OutputChunk
from actors.sandbox_actor import ExecOutput, SandboxInfo
from actors.sandboxes import choose_node, directory, warm_pool
from cave.errors import CaveError, SandboxError, SandboxNotFoundError, SandboxStateError
from config.settings import SandboxLimits, Settings

T = TypeVar("T")
PROBE_TIMEOUT_S = 5.0


@contextmanager
def translated(sandbox_id: str) -> Iterator[None]:
    """Ray's errors become CaveErrors: a dead actor is a state error, a CaveError raised inside
    the actor comes out as itself (Ray wraps it in RayTaskError)."""
    try:
        yield
    except RayTaskError as exc:
        if isinstance(exc.cause, CaveError):
            raise exc.cause from None
        raise SandboxError(f"sandbox {sandbox_id}: {exc.cause!r}") from exc
    except RayActorError as exc:
        raise SandboxStateError(f"sandbox {sandbox_id} is stopped or lost") from exc
    except (RaySystemError, GetTimeoutError) as exc:
        raise SandboxError(f"sandbox {sandbox_id}: {exc}") from exc


async def call(sandbox_id: str, ref: Awaitable[T]) -> T:
    with translated(sandbox_id):
        return await ref


async def create(
    sandbox_id: str, limits: SandboxLimits, settings: Settings, node_id: str | None = None
) -> tuple[ActorHandle, SandboxInfo]:
    """A started sandbox from its node's warm pool, registered in the directory."""
    node = await asyncio.to_thread(choose_node, node_id)  # ray.nodes() is a blocking GCS call
    pool = await asyncio.to_thread(warm_pool, node, settings)
    created: tuple[ActorHandle, SandboxInfo] = await call(
        sandbox_id, pool.create.remote(sandbox_id, limits, directory())
    )
    return created


async def lookup(sandbox_id: str) -> ActorHandle | None:
    """The sandbox's actor, or None when the directory does not know it."""
    try:
        entry: tuple[ActorHandle, str] = await call(
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
    The directory is asked for each actor, not a cache: another replica may have restarted one."""
    wanted = set(sandbox_ids)
    known = await known_ids()
    probed = sorted(wanted & known)
    dead = await asyncio.gather(*(_is_dead(sid, timeout_s) for sid in probed))
    return (wanted - known) | {sid for sid, gone in zip(probed, dead, strict=True) if gone}


async def _is_dead(sandbox_id: str, timeout_s: float) -> bool:
    actor = await lookup(sandbox_id)
    if actor is None:
        return True
    try:
        await asyncio.wait_for(actor.__ray_ready__.remote(), timeout_s)
    except ActorUnavailableError:
        return False  # unreachable for now (a network blip, a restarting node): ask again later
    except RayActorError:
        return True
    except TimeoutError:
        return False
    return False


async def forget(sandbox_id: str) -> None:
    """Drop a dead sandbox's directory entry, so that nothing tries its actor again."""
    await directory().remove.remote(sandbox_id)


async def stop(sandbox_id: str, actor: ActorHandle | None) -> SandboxInfo | None:
    """Stop the sandbox and end its actor; None when it was already gone."""
    actor = actor or await lookup(sandbox_id)
    if actor is None:
        return None
    try:
        info: SandboxInfo | None = await call(sandbox_id, actor.stop.remote())
    except (SandboxStateError, SandboxError):
        info = None  # already dead: what is left is the directory entry
    finally:
        await directory().remove.remote(sandbox_id)
        ray.kill(actor)
    return info


async def run(actor: ActorHandle, sandbox_id: str, argv: Any, **kwargs: Any) -> ExecOutput:
    output: ExecOutput = await call(sandbox_id, actor.run.remote(argv, **kwargs))
    return output


async def stream(
    actor: ActorHandle, sandbox_id: str, argv: Any, **kwargs: Any
) -> AsyncIterator[Any]:
    """The exec's items as they come: OutputChunks, then the ExecResult (or an exec id first
    when interactive)."""
    with translated(sandbox_id):
        refs: Any = actor.exec.remote(argv, **kwargs)
        async for ref in refs:
            item: OutputChunk | ExecResult | Any = await ref
            yield item
