"""SandboxDirectory: a named Ray actor that places sandboxes and maps their ids to actors and nodes.

It is the one place that counts sandboxes (and their memory limits) per node, so placement is
exact under concurrent creates: a create reserves a node here first, the node's warm pool
registers the started actor.
It lives on the head node, which a cluster cannot lose without losing everything else too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import ray

from actors.placement import (
    DEFAULT_POOL,
    Capacity,
    SandboxNode,
    demand_bundles,
    fits_somewhere,
    pick,
    sandbox_nodes,
)
from actors.sandbox_ref import SandboxRef
from cave.errors import CapacityError, SandboxNotFoundError

DIRECTORY_NAME = "cave-directory"
NODE_TABLE_TTL_S = 0.5  # ray.nodes() is a GCS round trip: placement reuses it this long
RESERVATION_TTL_S = 120.0  # a reservation never registered belongs to a create that died
HEAD_NODE = {"node:__internal_head__": 0.001}
RESTORE_TIMEOUT_S = 10.0

log = logging.getLogger("cave.placement")


class DirectoryService:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[SandboxRef, str]] = {}
        self._reserved: dict[str, tuple[str, float]] = {}  # sandbox id -> (node, deadline)
        self._waiting: dict[str, str] = {}  # sandbox id -> pool, creates waiting for room
        # sandbox id -> its memory limit in bytes, reserved or registered. Sandboxes restored
        # after a restart of this actor are not in it (their limits are the pools' to know).
        self._memory: dict[str, int] = {}
        self._nodes: dict[str, SandboxNode] = {}
        self._alive: set[str] = set()
        self._nodes_at = 0.0
        self._capacity = Capacity(max_per_node=1)  # until a caller says what it is
        self._demand_published = False
        if ray.is_initialized():
            self._restore()

    def _restore(self) -> None:
        """Register again what the warm pools handed out. Empty on a first start; after a crash
        (Ray restarts this actor with nothing in memory) it keeps the reconciler from taking
        every running sandbox for lost."""
        from actors.warm_pool import POOL_PREFIX

        pools = []
        for name in ray.util.list_named_actors():
            if name.startswith(POOL_PREFIX):
                try:
                    pools.append(ray.get_actor(name))
                except ValueError:
                    continue  # gone between the listing and here
        for pool in pools:
            try:
                reply: Any = pool.claims.remote()  # Ray's stubs can't type a remote result
                claims: dict[str, tuple[SandboxRef, str]] = ray.get(
                    reply, timeout=RESTORE_TIMEOUT_S
                )
            except Exception:  # a pool on a dead node: its sandboxes are lost anyway
                log.warning("directory restore: a warm pool did not answer", exc_info=True)
                continue
            self._entries.update(claims)
        if self._entries:
            log.warning("directory restored %d sandboxes from the warm pools", len(self._entries))

    # -- placement ---------------------------------------------------------------------------

    def reserve(
        self,
        sandbox_id: str,
        pool: str = DEFAULT_POOL,
        capacity: Capacity = Capacity(max_per_node=16),  # noqa: B008 (frozen: shared safely)
        wait: bool = False,
        memory_bytes: int = 0,
        overcommit: float = 1.0,
    ) -> str | None:
        """A node for this sandbox, held until it registers; None when the pool is full.
        `wait`: the caller will ask again, so the autoscaler is told about this create.
        CapacityError when no node of the pool could take its memory even empty."""
        self._refresh_nodes(capacity)
        self._expire_reservations()
        node = self._pick(pool, memory_bytes, overcommit)
        if node is None:  # before saying "full", look at the cluster as it is now: a node may
            self._refresh_nodes(capacity, force=True)  # have joined since the last look
            node = self._pick(pool, memory_bytes, overcommit)
        if node is None and not fits_somewhere(
            self._nodes.values(), pool, memory_bytes, overcommit
        ):
            raise CapacityError(
                f"a memory limit of {memory_bytes // 2**20} MiB is more than any node of pool "
                f"{pool!r} takes (its Ray `memory` resource x placement.memory_overcommit "
                f"{overcommit:g}); ask for less memory",
                "node_memory",
            )
        if node is None:
            if wait and self._waiting.get(sandbox_id) != pool:
                self._waiting[sandbox_id] = pool
                self._publish_demand()
            return None
        self._reserved[sandbox_id] = (node, time.monotonic() + RESERVATION_TTL_S)
        self._memory[sandbox_id] = memory_bytes
        if self._waiting.pop(sandbox_id, None) is not None:
            self._publish_demand()
        return node

    def _pick(self, pool: str, memory_bytes: int, overcommit: float) -> str | None:
        memory = self.memory_load()
        return pick(self._nodes.values(), self.load(), pool, memory, memory_bytes, overcommit)

    def release(self, sandbox_id: str) -> None:
        """Give up a reservation or a wait (the create failed or gave up)."""
        if self._reserved.pop(sandbox_id, None) is not None:
            self._memory.pop(sandbox_id, None)
        if self._waiting.pop(sandbox_id, None) is not None:
            self._publish_demand()

    def load(self) -> dict[str, int]:
        """Sandboxes per node, the reserved ones included."""
        counts = Counter(node for _, node in self._entries.values())
        counts.update(node for node, _ in self._reserved.values())
        return dict(counts)

    def memory_load(self) -> dict[str, int]:
        """Bytes of memory limits per node, the reserved sandboxes' included."""
        placed = [(node, sid) for sid, (_, node) in self._entries.items()]
        placed += [(node, sid) for sid, (node, _) in self._reserved.items()]
        total: Counter[str] = Counter()
        for node, sandbox_id in placed:
            total[node] += self._memory.get(sandbox_id, 0)
        return dict(total)

    def placement(self, capacity: Capacity) -> list[tuple[str, str, int, int]]:
        """Each sandbox node's (id, pool, sandboxes placed, capacity), for the metrics."""
        self._refresh_nodes(capacity)
        load = self.load()
        nodes = self._nodes.values()
        return [(n.node_id, n.pool, load.get(n.node_id, 0), n.capacity) for n in nodes]

    def nodes(self, capacity: Capacity) -> list[SandboxNode]:
        """The alive nodes that host sandboxes."""
        self._refresh_nodes(capacity)
        return list(self._nodes.values())

    def _refresh_nodes(self, capacity: Capacity, force: bool = False) -> None:
        now = time.monotonic()
        fresh = now - self._nodes_at < NODE_TABLE_TTL_S and capacity == self._capacity
        if fresh and not force:
            return
        table = ray.nodes()
        self._nodes = {n.node_id: n for n in sandbox_nodes(table, capacity)}
        self._alive = {n["NodeID"] for n in table if n.get("Alive")}
        self._nodes_at, self._capacity = now, capacity

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for sandbox_id, (_, deadline) in list(self._reserved.items()):
            if deadline < now:
                del self._reserved[sandbox_id]
                if sandbox_id not in self._entries:
                    self._memory.pop(sandbox_id, None)

    def _publish_demand(self) -> None:
        """Tell the autoscaler how many sandboxes want room: placed ones plus waiting ones.
        With nobody waiting the request is withdrawn, so that idle nodes may go again."""
        from ray.autoscaler.sdk import request_resources

        if not self._waiting:
            if self._demand_published:
                request_resources(bundles=[])
                self._demand_published = False
            return
        pools = {node.node_id: node.pool for node in self._nodes.values()}
        occupied: Counter[str] = Counter()
        for node, count in self.load().items():
            occupied[pools.get(node, DEFAULT_POOL)] += count
        named = {node.pool for node in self._nodes.values()} | set(self._waiting.values())
        request_resources(**demand_bundles(occupied, self._waiting.values(), named))
        self._demand_published = True

    # -- the directory -----------------------------------------------------------------------

    def register(self, sandbox_id: str, actor: SandboxRef, node_id: str) -> None:
        self._entries[sandbox_id] = (actor, node_id)
        self._reserved.pop(sandbox_id, None)

    def lookup(self, sandbox_id: str) -> tuple[SandboxRef, str]:
        try:
            return self._entries[sandbox_id]
        except KeyError:
            raise SandboxNotFoundError(f"no sandbox with id {sandbox_id!r}") from None

    def actors(self, sandbox_ids: list[str]) -> dict[str, SandboxRef]:
        """The actors of those of these sandboxes that are registered, in one call."""
        return {sid: self._entries[sid][0] for sid in sandbox_ids if sid in self._entries}

    def remove(self, sandbox_id: str, tickets: tuple[str, ...] | None = None) -> None:
        """Forget the sandbox; with `tickets`, only the incarnation started with one of them
        (a later start of the same id, on another actor, stays)."""
        entry = self._entries.get(sandbox_id)
        if entry is not None and tickets is not None and entry[0].ticket not in tickets:
            return
        self._entries.pop(sandbox_id, None)
        if sandbox_id not in self._reserved:  # a restart may have reserved it again meanwhile
            self._memory.pop(sandbox_id, None)

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def on_dead_nodes(self) -> list[str]:
        """The sandboxes registered on nodes that are no longer alive (checked now)."""
        self._refresh_nodes(self._capacity, force=True)
        for sandbox_id, (node, _) in list(self._reserved.items()):
            if node not in self._alive:
                del self._reserved[sandbox_id]
        return sorted(sid for sid, (_, node) in self._entries.items() if node not in self._alive)


SandboxDirectory = ray.remote(num_cpus=0, max_restarts=-1, resources=HEAD_NODE)(DirectoryService)
