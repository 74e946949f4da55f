"""WarmPool: a per-node actor that runs the node's sandbox hosts and keeps spares prepared in them.

Sandboxes live in a few host actors per node (`hosts_per_node`, actors/sandbox_actor.py), not
one Ray worker each: a create pays a sandbox's set-up, never a worker start. Spares (prepared,
unstarted sandboxes) make even the set-up happen ahead: `size_per_node` however quiet the node
is, and, while recent demand wants more (`max_per_node` at most), one prepared again after
each stop, so that the next burst finds the last one's spares waiting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.isolation import janitor
from actors.isolation.backend import Backend
from actors.isolation.guarantees import Isolation
from actors.sandbox_actor import MAX_CALLS, SandboxActor, SandboxInfo, backend_for
from actors.sandbox_ref import SandboxRef, StaleTicketError, new_ticket
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
REFILL_AT_ONCE = 2  # spares the refill prepares at a time (a burst's creates come first)
SPREAD_AT = 8  # sandboxes in each host before the pool starts another (up to hosts_per_node)
STARTING_WEIGHT = 16  # what a host still starting counts as, in sandboxes, when placing
SWEEP_EVERY_S = 1.0  # the janitor's sweep after claims, at most this often


def pool_name(node_id: str) -> str:
    return f"{POOL_PREFIX}{node_id}"


def pinned(node_id: str) -> dict[str, Any]:
    """Options that pin an actor to one node for its whole life (no soft fallback elsewhere)."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


@dataclass(eq=False)
class _Host:
    """A host actor of this node and what the pool placed in it."""

    actor: ActorHandle
    spares: int = 0  # prepared (or being prepared) here for the ready queue
    running: int = 0  # started here and not stopped yet
    served: int = 0  # sandboxes started here over its life
    up: bool = False  # its worker has started and answered

    @property
    def load(self) -> int:
        return self.spares + self.running


class PoolService:
    """Runs one node's sandbox hosts and keeps spares prepared in them: at least
    `size_per_node`, more while recent demand wants them (see the module's doc)."""

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
        self._hosts: list[_Host] = []
        self._ready: asyncio.Queue[_Host] = asyncio.Queue()  # one entry per prepared spare
        self._filling = 0  # spares being prepared
        self._starting = 0  # of those, the ones the refill prepares
        self._swept_at = -SWEEP_EVERY_S
        self._sweep_due = False  # a sweep is scheduled
        self._waiting = 0  # creates waiting for a spare being prepared
        self._demand: deque[float] = deque()  # when the creates of the last idle_s came
        self.counts = dict.fromkeys(("hosts_started", "hosts_retired", "prepared", "discarded"), 0)
        # What this pool handed out, so that a restarted directory can learn it again.
        self._claimed: dict[str, tuple[SandboxRef, _Host]] = {}
        self._refused: tuple[str, float] | None = None  # why this node cannot isolate, and when
        self._me: ActorHandle | None = None  # this pool as an actor: where hosts report stops

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

    def _host(self) -> _Host:
        """Where the next sandbox goes: the host with the least load that is not worn, where a
        host still starting (a Ray worker start, most of a second) counts STARTING_WEIGHT more,
        as if that many sandboxes were ahead in it. Once every host holds SPREAD_AT, another is
        started (up to `hosts_per_node`). So a trickle of creates stays on the hosts that are
        up while the next starts, and a burst spreads over the new ones too (one host's event
        loop uses one core)."""
        fit = [h for h in self._hosts if h.served + h.spares < self.settings.max_incarnations]
        least = min((h.load for h in fit), default=None)
        room = len(self._hosts) < self.settings.hosts_per_node
        if least is None or (least >= SPREAD_AT and room):
            fit.append(self._start_host())
        return min(fit, key=lambda h: (h.load + (0 if h.up else STARTING_WEIGHT), not h.up))

    def _start_host(self) -> _Host:
        self.counts["hosts_started"] += 1
        options = {**pinned(self.node_id), "max_concurrency": MAX_CALLS}
        actor = cast(ActorHandle, SandboxActor.options(**options).remote(self.isolation, self._me))
        host = _Host(actor)
        self._hosts.append(host)
        asyncio.ensure_future(self._bring_up(host))
        return host

    async def _bring_up(self, host: _Host) -> None:
        try:
            await host.actor.__ray_ready__.remote()
        except RayActorError:  # refused at its start (the node cannot isolate), or killed
            self._lost(host)
            return
        host.up = True

    def _lost(self, host: _Host) -> None:
        """A host that died: its spares are gone (its sandboxes too: the directory learns that
        from their refs)."""
        if host in self._hosts:
            self._hosts.remove(host)
            log.warning("a sandbox host on node %s died", self.node_id)
            if host.up:  # one that never came up is not started again and again
                self.keep_hosts()
        kept = [h for h in self._drain_queue() if h is not host]
        for h in kept:
            self._ready.put_nowait(h)

    def _drain_queue(self) -> list[_Host]:
        entries = []
        while not self._ready.empty():
            entries.append(self._ready.get_nowait())
        return entries

    def _retire_if_done(self, host: _Host, draining: bool = False) -> None:
        """End a host that holds nothing when it is worn (or the node drains); a worn one is
        replaced at once, so that the node keeps its hosts up for the next burst."""
        if host.load or host not in self._hosts:
            return
        if draining or host.served >= self.settings.max_incarnations:
            self._hosts.remove(host)
            self.counts["hosts_retired"] += 1
            # Ended after the calls already sent to it (a stop's reply among them) have answered.
            host.actor.__ray_terminate__.remote()
            if not draining:
                self.keep_hosts()

    def keep_hosts(self) -> None:
        """Start hosts, in the background, up to `hosts_per_node` not worn: a burst then spreads
        over hosts already up, and pays no worker start (half a second of CPU each)."""
        if self.size == self.ceiling == 0:
            return  # drained
        try:
            self._backend()
        except IsolationUnavailableError:
            return  # this node starts no sandbox, so no host either
        fresh = [h for h in self._hosts if h.served < self.settings.max_incarnations]
        for _ in range(self.settings.hosts_per_node - len(fresh)):
            self._start_host()

    def target(self) -> int:
        """Spares wanted now: the creates of the last idle_s, between the floor and ceiling."""
        horizon = time.monotonic() - self.settings.idle_s
        while self._demand and self._demand[0] < horizon:
            self._demand.popleft()
        return min(self.ceiling, max(self.size, len(self._demand)))

    async def _prepare_one(self, refilling: bool = False) -> None:
        host = self._host()
        host.spares += 1
        self._filling += 1
        self._starting += refilling
        try:
            await host.actor.prepare.remote(self.defaults)
        except Exception as exc:  # a failed spare is logged; the next create builds one itself
            host.spares -= 1
            if isinstance(exc, RayActorError):
                self._lost(host)
            log.exception("cannot prepare a warm sandbox on node %s", self.node_id)
            return
        finally:
            self._filling -= 1
            self._starting -= refilling
        self.counts["prepared"] += 1
        self._ready.put_nowait(host)
        if refilling:
            self.refill()  # the next of a floor larger than REFILL_AT_ONCE

    def refill(self) -> None:
        """Prepare spares toward the floor, REFILL_AT_ONCE at a time: a refill that prepared one
        per claim would, under a burst, race the burst's own creates for the same CPUs."""
        # Sandboxes of hosts that died without stopping them (crash, ray.kill) are swept here,
        # on their node, where the pool runs anyway after claims.
        try:
            backend = self._backend()
        except IsolationUnavailableError:
            return  # logged once; creates say why, and so does readiness
        self._sweep(backend)
        missing = self.size - self._ready.qsize() - self._filling
        for _ in range(max(0, min(missing, REFILL_AT_ONCE - self._starting))):
            asyncio.ensure_future(self._prepare_one(refilling=True))

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

    async def _take(self) -> _Host:
        """A host holding a prepared spare, if one is ready; else one whose spare is being
        prepared and no other create waits for yet; else the least loaded host, which builds
        the sandbox at its start (cold: pays the set-up, still no worker start).

        Under a burst of creates, waiting for a spare already on its way keeps the set-ups to
        one per create: building another beside it would cost this node's CPUs twice.
        """
        try:
            host = self._ready.get_nowait()
        except asyncio.QueueEmpty:
            host = None
        if host is None and self._filling > self._waiting:
            self._waiting += 1
            try:
                host = await asyncio.wait_for(self._ready.get(), SPARE_WAIT_S)
            except TimeoutError:
                pass  # that spare failed or is stuck: build one for this create
            finally:
                self._waiting -= 1
        if host is not None:
            host.spares -= 1
            return host
        return self._host()

    def _refill_after_reply(self) -> None:
        # Preparing a spare blocks this loop briefly (a new host: a GCS round trip) and costs
        # CPU that the caller's own sandbox needs: do it once the caller has its answer.
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self.refill)

    async def create(
        self, sandbox_id: str, limits: SandboxLimits, directory: ActorHandle
    ) -> tuple[SandboxRef, SandboxInfo]:
        """Start a sandbox in one of this node's hosts (a prepared spare if one is ready) and
        register it: one call for the client.

        The pool already talks to its hosts and to the directory, so the calls that follow
        cost no address lookups, which a client's first call to an actor does.
        """
        self._backend()  # a node that cannot isolate refuses before any sandbox is built
        self._demand.append(time.monotonic())
        try:
            return await self._create(sandbox_id, limits, directory)
        finally:
            self._refill_after_reply()

    async def _create(
        self, sandbox_id: str, limits: SandboxLimits, directory: ActorHandle
    ) -> tuple[SandboxRef, SandboxInfo]:
        for attempt in range(2):  # a host found dead is dropped, and another one tried
            host = await self._take()
            host.running += 1  # counted before the await, so _host() sees it
            host.served += 1
            ticket = new_ticket()
            try:
                info: SandboxInfo = await host.actor.start.remote(sandbox_id, limits, ticket)
            except RayActorError:
                host.running -= 1
                self._lost(host)
                if attempt:
                    raise
                continue
            except BaseException:  # the host tore down what it had built
                host.running -= 1
                self._retire_if_done(host)
                raise
            break
        ref = SandboxRef(host.actor, ticket)
        self._claimed[sandbox_id] = (ref, host)
        try:
            await directory.register.remote(sandbox_id, ref, self.node_id)
        except BaseException:
            host.actor.stop.remote(ticket)  # unknown to the directory: nobody else would
            raise
        if len(self._claimed) % PRUNE_EVERY == 0:
            asyncio.ensure_future(self.claims())  # forget the lost ones now and then
        return ref, info

    async def recycle(self, sandbox_id: str) -> None:
        """A host's report that a sandbox of this pool stopped (torn down, forgotten): while
        demand wants more spares than there are, one is prepared in its place."""
        claimed = self._claimed.pop(sandbox_id, None)
        if claimed is None:  # not one of this pool's (it restarted meanwhile, with new hosts)
            return
        host = claimed[1]
        host.running -= 1
        self._retire_if_done(host)
        if self._ready.qsize() + self._filling < self.target():
            await self._prepare_one()

    async def trim(self) -> int:
        """Discard the spares above what demand wants now (the pool shrinks when idle); how
        many. The hosts stay (an idle one costs its worker's memory and 7 ms/s of CPU)."""
        ended = 0
        while self._ready.qsize() > self.target():
            ended += 1
            try:
                await self._end_spare()
            except Exception:  # its sandbox's leftovers are the janitor's
                log.warning("discarding a spare on node %s failed", self.node_id, exc_info=True)
        return ended

    async def _end_spare(self) -> None:
        """Take a ready spare and tear it down in its host."""
        host = self._ready.get_nowait()
        host.spares -= 1
        self.counts["discarded"] += 1
        try:
            await host.actor.discard.remote()
        except RayActorError:
            self._lost(host)

    async def claims(self, timeout_s: float = 5.0) -> dict[str, tuple[SandboxRef, str]]:
        """The sandboxes this pool handed out that still run (the lost ones are forgotten
        here): what the directory registers again after a restart."""
        probes: dict[str, Any] = {sid: ref.ready() for sid, (ref, _) in self._claimed.items()}
        for sandbox_id, probe in probes.items():
            try:
                await asyncio.wait_for(probe, timeout_s)
            except (RayActorError, StaleTicketError):
                lost = self._claimed.pop(sandbox_id, None)
                if lost is not None:
                    lost[1].running -= 1
            except TimeoutError:
                pass  # busy or briefly unreachable is not dead
        return {sid: (ref, self.node_id) for sid, (ref, _) in self._claimed.items()}

    def stats(self) -> dict[str, int]:
        return {
            "ready": self._ready.qsize(),
            "filling": self._filling,
            "size": self.size,
            "target": self.target(),
            "hosts": len(self._hosts),
            "running": sum(h.running for h in self._hosts),
            **self.counts,
            "refused": int(self._refused is not None),
        }

    async def drain(self) -> None:
        """Discard the spares and stop refilling; hosts left with nothing end."""
        self.size = self.ceiling = 0
        while not self._ready.empty():
            await self._end_spare()
        for host in list(self._hosts):
            self._retire_if_done(host, draining=True)


class _FillingPool(PoolService):
    """As a Ray actor the pool starts its hosts and fills at once, not at its first call,
    hears of its hosts' stops, and trims itself when idle."""

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
        self.keep_hosts()
        asyncio.get_running_loop().call_later(TRIM_EVERY_S, self._tick)

    def _tick(self) -> None:
        asyncio.ensure_future(self.trim())
        asyncio.get_running_loop().call_later(TRIM_EVERY_S, self._tick)


WarmPool = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(_FillingPool)
