"""WarmPool: a per-node actor keeping sandbox actors prepared, so a create pays no worker start."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.isolation import janitor
from actors.isolation.backend import Backend
from actors.isolation.guarantees import Isolation
from actors.sandbox_actor import SandboxActor, SandboxInfo, backend_for
from cave.errors import IsolationUnavailableError
from config.settings import IsolationSettings, SandboxLimits

log = logging.getLogger("cave.pool")
NAMESPACE = "cave"
POOL_PREFIX = "cave-pool-"
PRUNE_EVERY = 64  # claims between two prunes of the handed-out list
REFILL_DELAY_S = 0.05
SPARE_WAIT_S = 30.0  # a create waiting for a spare in preparation starts its own after this
REPROBE_S = 30.0  # a node that refused to isolate is probed again after this (fixed meanwhile?)


def pool_name(node_id: str) -> str:
    return f"{POOL_PREFIX}{node_id}"


def pinned(node_id: str) -> dict[str, Any]:
    """Options that pin an actor to one node for its whole life (no soft fallback elsewhere)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


class PoolService:
    """Keeps `size` prepared sandbox actors on one node and refills in the background."""

    def __init__(
        self, node_id: str, isolation: IsolationSettings, defaults: SandboxLimits, size: int
    ) -> None:
        self.node_id, self.isolation, self.size = node_id, isolation, size
        self.defaults = defaults  # spares are built with these; a claim may change them
        self._ready: asyncio.Queue[ActorHandle] = asyncio.Queue()
        self._filling = 0
        self._waiting = 0  # creates waiting for a spare being prepared
        self.created = 0
        # What this pool handed out, so that a restarted directory can learn it again.
        self._claimed: dict[str, ActorHandle] = {}
        self._refused: tuple[str, float] | None = None  # why this node cannot isolate, and when

    def _backend(self) -> Backend:
        """This node's backend; IsolationUnavailableError, remembered a while, when it refuses
        (CAVE_ENV=production or no fallback): then no sandbox actor is ever started here."""
        if self._refused is not None and time.monotonic() - self._refused[1] < REPROBE_S:
            raise IsolationUnavailableError(self._refused[0])
        try:
            backend = backend_for(self.isolation)
        except IsolationUnavailableError as exc:
            if self._refused is None:
                log.error("node %s refuses to start sandboxes: %s", self.node_id, exc)
            self._refused = (str(exc), time.monotonic())
            raise
        self._refused = None
        return backend

    def isolation_report(self) -> Isolation:
        """What sandboxes started here get (readiness, metrics); raises when the node refuses."""
        return self._backend().isolation

    def _new_actor(self) -> ActorHandle:
        self.created += 1
        options = pinned(self.node_id)
        return cast(ActorHandle, SandboxActor.options(**options).remote(self.isolation))

    async def _prepare_one(self) -> None:
        self._filling += 1
        try:
            actor = self._new_actor()
            await actor.prepare.remote(self.defaults)
            self._ready.put_nowait(actor)
        except Exception:  # a failed spare is logged; the next create starts one itself
            log.exception("cannot prepare a warm sandbox on node %s", self.node_id)
        finally:
            self._filling -= 1

    def refill(self) -> None:
        # Sandboxes of actors that died without stop() (crash, ray.kill) are swept here, on
        # their node, where the pool runs anyway after every claim.
        try:
            janitor.sweep(self._backend())
        except IsolationUnavailableError:
            return  # logged once; creates say why, and so does readiness
        missing = self.size - self._ready.qsize() - self._filling
        for _ in range(max(0, missing)):
            asyncio.ensure_future(self._prepare_one())

    async def _take(self) -> ActorHandle:
        """A prepared actor if one is ready; else one being prepared that no other create
        waits for yet; else a fresh one (cold: pays the worker start).

        Under a burst of creates, waiting for a spare already on its way keeps the worker starts
        to one per create: starting a new one beside it would cost this node's CPUs twice.
        """
        try:
            return self._ready.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if self._filling > self._waiting:
            self._waiting += 1
            try:
                return await asyncio.wait_for(self._ready.get(), SPARE_WAIT_S)
            except TimeoutError:
                pass  # that spare failed or is stuck: start one for this create
            finally:
                self._waiting -= 1
        actor = self._new_actor()
        await actor.prepare.remote(self.defaults)
        return actor

    def _refill_after_reply(self) -> None:
        # A new spare costs a Ray worker start (a second of CPU here) and its creation blocks
        # this loop for a GCS round trip: start it once the caller has its answer.
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self.refill)

    async def create(
        self, sandbox_id: str, limits: SandboxLimits, directory: ActorHandle
    ) -> tuple[ActorHandle, SandboxInfo]:
        """Claim a spare, start it with these limits and register it: one call for the client.

        The pool already talks to its spares and to the directory, so the calls that follow the
        claim cost no address lookups, which a client's first call to a new actor does.
        """
        self._backend()  # a node that cannot isolate refuses before any actor starts
        actor = await self._take()
        try:
            info: SandboxInfo = await actor.start.remote(sandbox_id, limits)
            await directory.register.remote(sandbox_id, actor, self.node_id)
            self._claimed[sandbox_id] = actor
            if len(self._claimed) % PRUNE_EVERY == 0:
                asyncio.ensure_future(self.claims())  # forget the stopped ones now and then
        except BaseException:
            ray.kill(actor)
            raise
        finally:
            self._refill_after_reply()
        return actor, info

    async def claims(self, timeout_s: float = 5.0) -> dict[str, tuple[ActorHandle, str]]:
        """The sandboxes this pool handed out whose actors still live (the stopped ones are
        forgotten here): what the directory registers again after a restart."""
        probes: dict[str, Any] = {
            sid: actor.__ray_ready__.remote() for sid, actor in self._claimed.items()
        }
        for sandbox_id, probe in probes.items():
            try:
                await asyncio.wait_for(probe, timeout_s)
            except RayActorError:
                self._claimed.pop(sandbox_id, None)
            except TimeoutError:
                pass  # busy or briefly unreachable is not dead
        return {sid: (actor, self.node_id) for sid, actor in self._claimed.items()}

    def stats(self) -> dict[str, int]:
        return {
            "ready": self._ready.qsize(),
            "filling": self._filling,
            "size": self.size,
            "created": self.created,
            "refused": int(self._refused is not None),
        }

    async def drain(self) -> None:
        """Discard the spares (their standby launchers) and stop refilling."""
        self.size = 0
        while not self._ready.empty():
            actor = self._ready.get_nowait()
            try:
                await actor.discard.remote()
            finally:
                ray.kill(actor)


class _FillingPool(PoolService):
    """As a Ray actor the pool starts filling at once, not at its first call."""

    def __init__(
        self, node_id: str, isolation: IsolationSettings, defaults: SandboxLimits, size: int
    ) -> None:
        super().__init__(node_id, isolation, defaults, size)
        self.refill()


WarmPool = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(_FillingPool)
