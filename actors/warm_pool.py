"""WarmPool: a per-node actor keeping sandbox actors prepared, so a create pays no worker start."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.sandbox_actor import SandboxActor
from config.settings import IsolationSettings, SandboxLimits

log = logging.getLogger("cave.pool")
NAMESPACE = "cave"


def pool_name(node_id: str) -> str:
    return f"cave-pool-{node_id}"


def pinned(node_id: str) -> dict[str, Any]:
    """Options that pin an actor to one node for its whole life (no soft fallback elsewhere)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


class PoolService:
    """Keeps `size` prepared sandbox actors on one node and refills in the background."""

    def __init__(self, node_id: str, isolation: IsolationSettings, defaults: SandboxLimits,
                 size: int) -> None:
        self.node_id, self.isolation, self.size = node_id, isolation, size
        self.defaults = defaults  # spares are built with these; a claim may change them
        self._ready: asyncio.Queue[ActorHandle] = asyncio.Queue()
        self._filling = 0
        self.created = 0

    def _new_actor(self) -> ActorHandle:
        self.created += 1
        options = pinned(self.node_id)
        return SandboxActor.options(**options).remote(self.isolation)  # type: ignore[attr-defined]

    async def _prepare_one(self) -> None:
        self._filling += 1
        try:
            actor = self._new_actor()
            await actor.prepare.remote(self.defaults)
            self._ready.put_nowait(actor)
        except Exception:  # a failed spare is logged; the next acquire starts one itself
            log.exception("cannot prepare a warm sandbox on node %s", self.node_id)
        finally:
            self._filling -= 1

    def refill(self) -> None:
        missing = self.size - self._ready.qsize() - self._filling
        for _ in range(max(0, missing)):
            asyncio.ensure_future(self._prepare_one())

    async def acquire(self) -> ActorHandle:
        """A prepared actor if one is ready, else a fresh one (cold: pays the worker start)."""
        try:
            actor = self._ready.get_nowait()
        except asyncio.QueueEmpty:
            actor = self._new_actor()
            await actor.prepare.remote(self.defaults)
        self.refill()
        return actor

    def stats(self) -> dict[str, int]:
        return {"ready": self._ready.qsize(), "filling": self._filling, "size": self.size,
                "created": self.created}

    async def drain(self) -> None:
        """Discard the spares (their standby launchers) and stop refilling."""
        self.size = 0
        while not self._ready.empty():
            actor = self._ready.get_nowait()
            try:
                await actor.discard.remote()
            finally:
                ray.kill(actor)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class WarmPool:
    def __init__(self, node_id: str, isolation: IsolationSettings, defaults: SandboxLimits,
                 size: int) -> None:
        self._service = PoolService(node_id, isolation, defaults, size)
        self._service.refill()

    async def acquire(self) -> ActorHandle:
        return await self._service.acquire()

    def stats(self) -> dict[str, int]:
        return self._service.stats()

    async def drain(self) -> None:
        await self._service.drain()
