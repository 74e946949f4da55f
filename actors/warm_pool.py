"""WarmPool: a per-node actor keeping sandbox actors prepared, so a create pays no worker start.

Spares come from two places: new actors, started to keep `size_per_node` ready however quiet
the node is, and the actors of stopped sandboxes, which come back here (SandboxService.stop)
and are prepared again while recent demand wants them (`max_per_node` at most). A burst thus
pays its worker starts once: the next one finds the last one's actors waiting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.isolation import janitor
from actors.isolation.backend import Backend
from actors.isolation.guarantees import Isolation
from actors.sandbox_actor import SandboxActor, SandboxInfo, backend_for
from actors.sandbox_ref import SandboxRef, new_ticket
from cave.errors import IsolationUnavailableError
from config.settings import IsolationSettings, PoolSettings, SandboxLimits

log = logging.getLogger("cave.pool")
NAMESPACE = "cave"
POOL_PREFIX = "cave-pool-"
PRUNE_EVERY = 64  # claims between two prunes of the handed-out list
REFILL_DELAY_S = 0.05
SPARE_WAIT_S = 30.0  # a create waiting for a spare in preparation starts its own after this
REPROBE_S = 30.0  # a node that refused to isolate is probed again after this (fixed meanwhile?)
TRIM_EVERY_S = 15.0  # how often an idle pool looks whether it holds more spares than wanted
REFILL_AT_ONCE = 2  # new workers the refill starts at a time (Ray starts as many as CPUs)
SWEEP_EVERY_S = 1.0  # the janitor's sweep after claims, at most this often


def pool_name(node_id: str) -> str:
    return f"{POOL_PREFIX}{node_id}"


def pinned(node_id: str) -> dict[str, Any]:
    """Options that pin an actor to one node for its whole life (no soft fallback elsewhere)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


class PoolService:
    """Keeps prepared sandbox actors on one node: at least `size_per_node`, more while recent
    demand wants them (see the module's doc)."""

    def __init__(
        self,
        node_id: str,
        isolation: IsolationSettings,
        defaults: SandboxLimits,
        settings: PoolSettings,
    ) -> None:
        self.node_id, self.isolation, self.settings = node_id, isolation, settings
        self.size = settings.size_per_node  # the floor; drain sets it to 0
        self.ceiling = max(settings.max_per_node, self.size)
        self.defaults = defaults  # spares are built with these; a claim may change them
        self._ready: asyncio.Queue[ActorHandle] = asyncio.Queue()
        self._filling = 0  # spares on their way: new ones and recycled ones
        self._starting = 0  # new workers the refill is starting now
        self._swept_at = -SWEEP_EVERY_S
        self._sweep_due = False  # a sweep is scheduled
        self._waiting = 0  # creates waiting for a spare being prepared
        self._demand: deque[float] = deque()  # when the creates of the last idle_s came
        self.created = 0
        self.recycled = 0
        self.retired = 0
        # What this pool handed out, so that a restarted directory can learn it again.
        self._claimed: dict[str, SandboxRef] = {}
        self._refused: tuple[str, float] | None = None  # why this node cannot isolate, and when
        self._me: ActorHandle | None = None  # this pool as an actor: where stopped actors return

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
        return cast(ActorHandle, SandboxActor.options(**options).remote(self.isolation, self._me))

    def target(self) -> int:
        """Spares wanted now: the creates of the last idle_s, between the floor and ceiling."""
        horizon = time.monotonic() - self.settings.idle_s
        while self._demand and self._demand[0] < horizon:
            self._demand.popleft()
        return min(self.ceiling, max(self.size, len(self._demand)))

    async def _prepare_one(self) -> None:
        self._filling += 1
        self._starting += 1
        prepared = False
        try:
            actor = self._new_actor()
            await actor.prepare.remote(self.defaults)
            self._ready.put_nowait(actor)
            prepared = True
        except Exception:  # a failed spare is logged; the next create starts one itself
            log.exception("cannot prepare a warm sandbox on node %s", self.node_id)
        finally:
            self._filling -= 1
            self._starting -= 1
        if prepared:
            self.refill()  # the next of a floor larger than REFILL_AT_ONCE

    def refill(self) -> None:
        """Start new spares toward the floor, REFILL_AT_ONCE at a time: a refill that started
        one worker per claim would, under a burst, race the burst's own creates for the same
        CPUs (with a floor of 100, a warm burst of 100 took minutes that way)."""
        # Sandboxes of actors that died without stop() (crash, ray.kill) are swept here, on
        # their node, where the pool runs anyway after claims.
        try:
            backend = self._backend()
        except IsolationUnavailableError:
            return  # logged once; creates say why, and so does readiness
        self._sweep(backend)
        missing = self.size - self._ready.qsize() - self._filling
        for _ in range(max(0, min(missing, REFILL_AT_ONCE - self._starting))):
            asyncio.ensure_future(self._prepare_one())

    def _sweep(self, backend: Backend) -> None:
        """The janitor's sweep now, or once SWEEP_EVERY_S after the last (a burst's claims
        would sweep the node's whole state directory once each)."""
        wait_s = self._swept_at + SWEEP_EVERY_S - time.monotonic()
        if wait_s <= 0:
            self._swept_at, self._sweep_due = time.monotonic(), False
            janitor.sweep(backend)
        elif not self._sweep_due:
            self._sweep_due = True
            asyncio.get_running_loop().call_later(wait_s, self._sweep, backend)

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
    ) -> tuple[SandboxRef, SandboxInfo]:
        """Claim a spare, start it with these limits and register it: one call for the client.

        The pool already talks to its spares and to the directory, so the calls that follow the
        claim cost no address lookups, which a client's first call to a new actor does.
        """
        self._backend()  # a node that cannot isolate refuses before any actor starts
        self._demand.append(time.monotonic())
        actor = await self._take()
        try:
            ticket = new_ticket()
            info: SandboxInfo = await actor.start.remote(sandbox_id, limits, ticket)
            ref = SandboxRef(actor, ticket)
            await directory.register.remote(sandbox_id, ref, self.node_id)
            self._claimed[sandbox_id] = ref
            if len(self._claimed) % PRUNE_EVERY == 0:
                asyncio.ensure_future(self.claims())  # forget the stopped ones now and then
        except BaseException:
            ray.kill(actor)
            raise
        finally:
            self._refill_after_reply()
        return ref, info

    async def recycle(self, sandbox_id: str, actor: ActorHandle, incarnations: int) -> None:
        """A stopped sandbox's actor, back from its stop (torn down, its sandbox forgotten):
        prepared again as a spare while demand wants one, else ended."""
        claimed = self._claimed.pop(sandbox_id, None)
        if claimed is None:  # not one of this pool's (it restarted meanwhile): not reused
            actor.__ray_terminate__.remote()  # after its stop has answered, as below
            return
        # The pool's own handle, not the one the actor sent: an actor's handle to itself does
        # not keep it alive, and this pool's handle is the one that owns it.
        actor = claimed.actor
        worn = incarnations >= self.settings.max_incarnations
        if worn or self._ready.qsize() + self._filling >= self.target():
            self.retired += 1
            # Ended after the stop that sent it here has answered its caller: a ray.kill could
            # land before that reply, and the caller would take the stop for failed.
            actor.__ray_terminate__.remote()
            return
        self._filling += 1
        try:
            await actor.prepare.remote(self.defaults)
            self._ready.put_nowait(actor)
            self.recycled += 1
        except Exception:  # not fit to serve again: end it; the floor's refill replaces it
            log.warning("a recycled sandbox actor on node %s failed", self.node_id, exc_info=True)
            ray.kill(actor)
        finally:
            self._filling -= 1

    async def trim(self) -> int:
        """End the spares above what demand wants now (the pool shrinks when idle); how many."""
        ended = 0
        while self._ready.qsize() > self.target():
            ended += 1
            self.retired += 1
            try:
                await self._end_spare()
            except Exception:  # its sandbox's leftovers are the janitor's
                log.warning("discarding a spare on node %s failed", self.node_id, exc_info=True)
        return ended

    async def _end_spare(self) -> None:
        """Take a ready spare, tear its standby sandbox down and end its actor."""
        actor = self._ready.get_nowait()
        try:
            await actor.discard.remote()
        finally:
            ray.kill(actor)

    async def claims(self, timeout_s: float = 5.0) -> dict[str, tuple[SandboxRef, str]]:
        """The sandboxes this pool handed out whose actors still live (the stopped ones are
        forgotten here): what the directory registers again after a restart."""
        probes: dict[str, Any] = {sid: ref.ready() for sid, ref in self._claimed.items()}
        for sandbox_id, probe in probes.items():
            try:
                await asyncio.wait_for(probe, timeout_s)
            except RayActorError:
                self._claimed.pop(sandbox_id, None)
            except TimeoutError:
                pass  # busy or briefly unreachable is not dead
        return {sid: (ref, self.node_id) for sid, ref in self._claimed.items()}

    def stats(self) -> dict[str, int]:
        return {
            "ready": self._ready.qsize(),
            "filling": self._filling,
            "size": self.size,
            "target": self.target(),
            "created": self.created,
            "recycled": self.recycled,
            "retired": self.retired,
            "refused": int(self._refused is not None),
        }

    async def drain(self) -> None:
        """Discard the spares (their standby launchers) and stop refilling and recycling."""
        self.size = self.ceiling = 0
        while not self._ready.empty():
            await self._end_spare()


class _FillingPool(PoolService):
    """As a Ray actor the pool starts filling at once, not at its first call, takes back the
    actors of stopped sandboxes, and trims itself when idle."""

    def __init__(
        self,
        node_id: str,
        isolation: IsolationSettings,
        defaults: SandboxLimits,
        settings: PoolSettings,
    ) -> None:
        super().__init__(node_id, isolation, defaults, settings)
        self._me = ray.get_runtime_context().current_actor
        self.refill()
        asyncio.get_running_loop().call_later(TRIM_EVERY_S, self._tick)

    def _tick(self) -> None:
        asyncio.ensure_future(self.trim())
        asyncio.get_running_loop().call_later(TRIM_EVERY_S, self._tick)


WarmPool = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(_FillingPool)
