"""The placement rules on Ray's node table, without Ray: which nodes, which one, what demand."""

from __future__ import annotations

from typing import Any

import pytest

from actors.placement import (
    UNKNOWN_MEMORY_CAPACITY,
    Capacity,
    SandboxNode,
    demand_bundles,
    fits_somewhere,
    pick,
    sandbox_nodes,
)
from cave.errors import ConfigError
from config.settings import load_settings


def entry(node_id: str, alive: bool = True, slots: int | None = None, **labels: str) -> Any:
    resources = {"CPU": 4.0, **({"cave_sandbox": float(slots)} if slots else {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources, "Labels": labels}


def test_only_nodes_declaring_cave_sandbox_take_sandboxes_with_their_own_capacity() -> None:
    table = [entry("head"), entry("a", slots=50), entry("b", slots=10), entry("dead", False, 50)]
    nodes = sandbox_nodes(table, Capacity(16))
    assert [(n.node_id, n.capacity) for n in nodes] == [("a", 50), ("b", 10)]


def test_a_cluster_where_no_node_declares_it_uses_every_alive_node() -> None:
    nodes = sandbox_nodes([entry("one"), entry("two"), entry("gone", False)], Capacity(16))
    assert [(n.node_id, n.capacity) for n in nodes] == [("one", 16), ("two", 16)]


def test_the_pool_comes_from_the_cave_pool_label() -> None:
    nodes = sandbox_nodes(
        [entry("t", slots=2, **{"cave.pool": "trusted"}), entry("d", slots=2)], Capacity(1)
    )
    assert {n.node_id: n.pool for n in nodes} == {"t": "trusted", "d": "default"}


def test_the_least_loaded_node_relative_to_its_size_wins() -> None:
    nodes = [SandboxNode("big", 10), SandboxNode("small", 2)]
    assert pick(nodes, {"big": 4, "small": 1}) == "big"  # 40% < 50%
    assert pick(nodes, {"big": 6, "small": 1}) == "small"  # 60% > 50%


def test_equal_nodes_fill_in_turn() -> None:
    nodes = [SandboxNode(n, 3) for n in ("a", "b", "c")]
    load: dict[str, int] = {}
    order = []
    for _ in range(6):
        node = pick(nodes, load)
        assert node is not None
        order.append(node)
        load[node] = load.get(node, 0) + 1
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_full_nodes_and_other_pools_are_never_picked() -> None:
    nodes = [SandboxNode("a", 1), SandboxNode("t", 5, pool="trusted")]
    assert pick(nodes, {"a": 1}) is None
    assert pick(nodes, {"a": 1}, pool="trusted") == "t"
    assert pick(nodes, {}, pool="gpu") is None


def test_demand_asks_room_for_the_placed_and_the_waiting() -> None:
    demand = demand_bundles({"default": 2, "trusted": 1}, ["trusted"], ["default", "trusted"])
    assert demand["bundles"] == [{"cave_sandbox": 1}] * 4
    trusted, elsewhere = {"cave.pool": "trusted"}, {"cave.pool": "!in(trusted)"}
    assert demand["bundle_label_selectors"] == [elsewhere, elsewhere, trusted, trusted]
    # Ray's own check of label selectors passes them (a bad one makes the request fail).
    from ray._private.label_utils import validate_label_selector

    assert all(validate_label_selector(s) is None for s in demand["bundle_label_selectors"])


def test_without_named_pools_default_demand_needs_no_selector() -> None:
    demand = demand_bundles({"default": 1}, ["default"], ["default"])
    assert demand["bundle_label_selectors"] == [{}, {}]


def test_placement_settings_come_from_the_file_and_the_environment() -> None:
    settings = load_settings(env={})
    assert settings.placement.max_per_node is None  # from each node's memory
    assert settings.placement.memory_overcommit == 4.0
    assert settings.placement.restricted_pools == ("trusted",)
    changed = load_settings(
        env={"CAVE_MAX_SANDBOXES_PER_NODE": "40", "CAVE_PLACEMENT_MAX_WAIT_S": "10"}
    )
    assert (changed.placement.max_per_node, changed.placement.max_wait_s) == (40, 10.0)


@pytest.mark.parametrize(
    "variable, value", [("CAVE_MAX_SANDBOXES_PER_NODE", "0"), ("CAVE_PLACEMENT_MAX_WAIT_S", "x")]
)
def test_bad_placement_settings_are_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(env={variable: value})


def test_memory_limits_placed_on_a_node_stay_within_its_budget() -> None:
    gib = 2**30
    nodes = [SandboxNode("a", 10, memory_bytes=4 * gib), SandboxNode("b", 10, memory_bytes=2 * gib)]
    placed = {"a": 7 * gib, "b": 1 * gib}  # overcommit 2: a takes 8 GiB of limits, b 4 GiB
    assert pick(nodes, {"a": 1, "b": 1}, memory=placed, memory_bytes=gib, overcommit=2) == "a"
    assert pick(nodes, {}, memory=placed, memory_bytes=2 * gib, overcommit=2) == "b"
    assert pick(nodes, {}, memory=placed, memory_bytes=4 * gib, overcommit=2) is None
    assert not fits_somewhere(nodes, "default", 9 * gib, 2)  # bigger than any node, even empty
    assert fits_somewhere(nodes, "default", 8 * gib, 2) and fits_somewhere([], "default", gib, 2)


def test_the_memory_of_a_node_is_its_ray_memory_resource() -> None:
    node = entry("m", slots=4)
    node["Resources"]["memory"] = 3.0 * 2**30
    assert sandbox_nodes([node], Capacity(16))[0].memory_bytes == 3 * 2**30
    unknown = SandboxNode("u", 1)  # no memory resource: memory is not what limits it
    assert pick([unknown], {}, memory_bytes=2**50) == "u"


def test_a_node_that_declares_nothing_takes_what_its_memory_holds() -> None:
    gib = 2**30
    small, big, unknown = entry("small"), entry("big"), entry("unknown")
    small["Resources"]["memory"], big["Resources"]["memory"] = 2.0 * gib, 16.0 * gib
    rule = Capacity(sandbox_memory_bytes=gib // 2, memory_overcommit=4.0)
    nodes = sandbox_nodes([small, big, unknown], rule)
    assert [(n.node_id, n.capacity) for n in nodes] == [
        ("small", 16),  # 2 GiB x 4 / 512 MiB
        ("big", 128),
        ("unknown", UNKNOWN_MEMORY_CAPACITY),  # Ray knows no memory: a fixed number
    ]
    fixed = Capacity(max_per_node=40, sandbox_memory_bytes=gib // 2, memory_overcommit=4.0)
    assert {n.capacity for n in sandbox_nodes([small, big], fixed)} == {40}  # the operator's
    declared = entry("declared", slots=3)
    declared["Resources"]["memory"] = 16.0 * gib
    assert sandbox_nodes([declared], rule)[0].capacity == 3  # `cave_sandbox` wins
    tiny = Capacity(sandbox_memory_bytes=64 * gib, memory_overcommit=1.0)
    assert sandbox_nodes([small], tiny)[0].capacity == 1  # never zero


def test_the_derived_capacity_follows_the_default_limits_and_the_overcommit() -> None:
    from actors.remote import capacity

    settings = load_settings(env={"CAVE_DEFAULT_MEMORY_MB": "1024", "CAVE_MEMORY_OVERCOMMIT": "2"})
    assert capacity(settings) == Capacity(None, 1024 * 2**20, 2.0)
    assert capacity(settings).of(8 * 2**30) == 16
    fixed = load_settings(env={"CAVE_MAX_SANDBOXES_PER_NODE": "7"})
    assert capacity(fixed).of(8 * 2**30) == 7
