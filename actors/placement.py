"""Which node takes the next sandbox: plain functions over Ray's node table, no Ray calls.

A node offers sandboxes when it carries the custom resource `cave_sandbox`; its amount is the
most sandboxes the node takes. A cluster where no node carries it (a laptop's `ray.init()`) uses
every alive node, each taking what its memory holds (`Capacity`): its Ray `memory` resource times
the overcommit factor, over a default sandbox's memory limit; or `max_per_node` when the operator
fixed one. The node label `cave.pool` puts a node in a pool;
a sandbox asks for a pool by name, and one that asks for none goes to nodes of no pool.
A node also takes sandboxes whose memory limits add up to at most its Ray `memory` resource
times the overcommit factor (`placement.memory_overcommit`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SANDBOX_RESOURCE = "cave_sandbox"
POOL_LABEL = "cave.pool"
DEFAULT_POOL = "default"  # the pool of nodes without a `cave.pool` label
UNKNOWN_MEMORY_CAPACITY = 16  # a node that reports no `memory` resource (none known to Ray)


@dataclass(frozen=True)
class Capacity:
    """How many sandboxes a node takes when it does not say (no `cave_sandbox` resource)."""

    max_per_node: int | None = None  # fixed by the operator; None: from the node's memory
    sandbox_memory_bytes: int = 512 * 2**20  # a default sandbox's memory limit
    memory_overcommit: float = 1.0

    def of(self, memory_bytes: int) -> int:
        """A node's capacity from its Ray `memory` resource: as many default sandboxes as
        its memory budget (memory x overcommit) holds, at least one."""
        if self.max_per_node is not None:
            return self.max_per_node
        if memory_bytes <= 0 or self.sandbox_memory_bytes <= 0:
            return UNKNOWN_MEMORY_CAPACITY
        return max(1, int(memory_bytes * self.memory_overcommit // self.sandbox_memory_bytes))


@dataclass(frozen=True)
class SandboxNode:
    node_id: str
    capacity: int
    pool: str = DEFAULT_POOL
    labels: Mapping[str, str] = field(default_factory=dict)
    memory_bytes: int = 0  # Ray's `memory` resource; 0: unknown, memory is not checked

    def memory_budget(self, overcommit: float) -> float:
        return self.memory_bytes * overcommit if self.memory_bytes else float("inf")


def sandbox_nodes(nodes: Iterable[Mapping[str, Any]], capacity: Capacity) -> list[SandboxNode]:
    """The alive nodes that host sandboxes, from `ray.nodes()` entries; `capacity`: how many
    a node that declares none takes."""
    alive = [n for n in nodes if n.get("Alive")]
    declared = [n for n in alive if n.get("Resources", {}).get(SANDBOX_RESOURCE, 0) > 0]
    if declared:
        return [_node(n, int(n["Resources"][SANDBOX_RESOURCE])) for n in declared]
    return [_node(n, capacity.of(_memory(n))) for n in alive]


def _memory(entry: Mapping[str, Any]) -> int:
    return int(entry.get("Resources", {}).get("memory", 0))


def _node(entry: Mapping[str, Any], capacity: int) -> SandboxNode:
    labels = dict(entry.get("Labels") or {})
    pool = labels.get(POOL_LABEL, DEFAULT_POOL)
    return SandboxNode(entry["NodeID"], capacity, pool, labels, _memory(entry))


def pick(
    nodes: Iterable[SandboxNode],
    load: Mapping[str, int],
    pool: str = DEFAULT_POOL,
    memory: Mapping[str, int] | None = None,
    memory_bytes: int = 0,
    overcommit: float = 1.0,
) -> str | None:
    """The least loaded node of the pool with room left, or None when every one is full.
    Room is a free place (capacity) and, for `memory_bytes`, memory limits not yet placed
    (`memory`: bytes of limits per node) within the node's budget.

    Load is relative to capacity, so that a node twice the size takes twice the sandboxes; ties
    go to the node with fewer sandboxes, then by id, so that equal nodes fill in turn.
    """
    best: tuple[float, int, str] | None = None
    for node in nodes:
        used = load.get(node.node_id, 0)
        if node.pool != pool or used >= node.capacity:
            continue
        taken = (memory or {}).get(node.node_id, 0)
        if taken + memory_bytes > node.memory_budget(overcommit):
            continue
        rank = (used / node.capacity, used, node.node_id)
        if best is None or rank < best:
            best = rank
    return None if best is None else best[2]


def fits_somewhere(
    nodes: Iterable[SandboxNode], pool: str, memory_bytes: int, overcommit: float
) -> bool:
    """Whether an empty node of the pool could take a sandbox this big (True for no nodes: one
    may join)."""
    budgets = [n.memory_budget(overcommit) for n in nodes if n.pool == pool]
    return not budgets or memory_bytes <= max(budgets)


def demand_bundles(
    occupied: Mapping[str, int], waiting: Iterable[str], pools: Iterable[str] = ()
) -> dict[str, Any]:
    """`ray.autoscaler.sdk.request_resources` arguments asking room for every placed sandbox
    (by pool) and every waiting create. The autoscaler compares them with the cluster's total
    `cave_sandbox` capacity, so the waiting ones are what makes it add a node. `pools`: the
    named pools the cluster has, which a default-pool bundle must not be served from."""
    wanted = [pool for pool, count in occupied.items() for _ in range(count)] + list(waiting)
    named = sorted(set(pools) - {DEFAULT_POOL})
    not_named = {POOL_LABEL: f"!in({','.join(named)})"} if named else {}
    return {
        "bundles": [{SANDBOX_RESOURCE: 1} for _ in wanted],
        "bundle_label_selectors": [
            dict(not_named) if pool == DEFAULT_POOL else {POOL_LABEL: pool} for pool in wanted
        ],
    }
