"""Where sandboxes and engines land on a cluster of several nodes, and what happens when full."""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.api.conftest import make_namespace_key
from tests.multinode.conftest import GPU_MODEL, SLOTS, MultiNode
from tests.support import poll_until


def create(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/api/v1/sandboxes", json=body)


def exec_ok(client: httpx.Client, sandbox_id: str, command: str = "echo hi") -> dict[str, Any]:
    response = client.post(f"/api/v1/sandboxes/{sandbox_id}/exec", json={"command": command})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert result["exit_code"] == 0, result
    return result


def fill(multinode: MultiNode, client: httpx.Client) -> int:
    """Start sandboxes until the two sandbox nodes are full; how many that took."""
    capacity = SLOTS * len(multinode.sandbox_nodes)
    for _ in range(capacity):
        assert create(client).status_code == 201
    return capacity


def alive_actors() -> list[dict[str, Any]]:
    """Ray's own actor table (the GCS's; the state API would need the dashboard)."""
    import ray

    return [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]


def actor_node(sandbox_id: str) -> str:
    """The node Ray runs the sandbox's actor on, asked of Ray, not of CAVE."""
    import ray

    from actors.sandboxes import directory

    ref, _ = ray.get(directory().lookup.remote(sandbox_id))
    entry = ray._private.state.actors(ref.actor._actor_id.hex())
    return str(entry["Address"]["NodeID"])


def autoscaler_demand() -> list[dict[str, float]]:
    """The resource request the Ray autoscaler reads (request_resources' channel)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def stop_all_sandboxes(client: httpx.Client) -> None:
    page = client.get("/api/v1/sandboxes", params={"state": "running", "limit": 200}).json()
    for item in page["items"]:
        assert client.delete(f"/api/v1/sandboxes/{item['id']}").status_code == 204


@pytest.fixture
def client(multinode: MultiNode) -> Any:
    with multinode.client() as c:
        yield c
        stop_all_sandboxes(c)


def test_every_sandbox_node_gets_a_warm_pool_that_fills(multinode: MultiNode) -> None:
    import ray

    from actors.warm_pool import NAMESPACE, POOL_PREFIX, pool_name

    def ready(node: str) -> int:
        try:
            pool = ray.get_actor(pool_name(node), namespace=NAMESPACE)
        except ValueError:
            return 0  # not started yet
        stats: dict[str, int] = ray.get(pool.stats.remote())
        return stats["ready"]

    for node in multinode.sandbox_nodes:  # started by the API's upkeep, before any create
        poll_until(lambda node=node: ready(node) >= 1, timeout_s=60, what=f"{node}'s pool")
    pools = {n for n in ray.util.list_named_actors() if n.startswith(POOL_PREFIX)}
    assert pool_name(multinode.gpu_node) not in pools  # a node that takes no sandboxes


def test_sandboxes_spread_over_sandbox_nodes_and_stay_there(
    multinode: MultiNode, client: httpx.Client
) -> None:
    created = []
    for _ in range(4):
        response = create(client)
        assert response.status_code == 201, response.text
        created.append(response.json())

    per_node = Counter(s["node_id"] for s in created)
    assert set(per_node) == set(multinode.sandbox_nodes)  # not the head, not the GPU node
    assert sorted(per_node.values()) == [2, 2]
    metrics = client.get("/metrics").text  # what an operator's dashboard shows
    for node in multinode.sandbox_nodes:
        labels = f'node_id="{node}",pool="default"'
        assert f"cave_node_sandboxes{{{labels}}} 2.0" in metrics
        assert f"cave_node_sandbox_capacity{{{labels}}} {float(SLOTS)}" in metrics
    for sandbox in created:
        assert actor_node(sandbox["id"]) == sandbox["node_id"]
        exec_ok(client, sandbox["id"])
        again = client.get(f"/api/v1/sandboxes/{sandbox['id']}").json()
        assert again["node_id"] == sandbox["node_id"]
        assert actor_node(sandbox["id"]) == sandbox["node_id"]


def test_a_full_cluster_refuses_at_once_with_429_and_writes_nothing(
    multinode: MultiNode, client: httpx.Client
) -> None:
    fill(multinode, client)
    before = client.get("/api/v1/sandboxes", params={"limit": 200}).json()["items"]

    refused = create(client, name="one-too-many")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "capacity"
    assert "room" in error["message"]
    after = client.get("/api/v1/sandboxes", params={"limit": 200}).json()["items"]
    assert [s["id"] for s in after] == [s["id"] for s in before]

    # A sandbox recorded without starting can be created, and its start is refused alike.
    idle = create(client, start=False)
    assert idle.status_code == 201
    start = client.post(f"/api/v1/sandboxes/{idle.json()['id']}/start")
    assert start.status_code == 429
    assert client.get(f"/api/v1/sandboxes/{idle.json()['id']}").json()["state"] == "created"


def test_a_waiting_create_asks_the_autoscaler_and_lands_on_the_node_it_adds(
    multinode: MultiNode, client: httpx.Client
) -> None:
    capacity = fill(multinode, client)
    outcome: dict[str, httpx.Response] = {}

    def waiting_create() -> None:
        with multinode.client() as other:
            outcome["response"] = create(other, wait_s=90)

    thread = threading.Thread(target=waiting_create)
    thread.start()
    demand = poll_until(
        lambda: [b for b in autoscaler_demand() if b.get("cave_sandbox")],
        timeout_s=30,
        what="the waiting create's demand reaching the autoscaler",
    )
    assert len(demand) == capacity + 1  # room for what runs, and one more

    new_node = multinode.add_sandbox_node(slots=1)  # what the autoscaler would do
    thread.join(timeout=90)
    response = outcome["response"]
    assert response.status_code == 201, response.text
    assert response.json()["node_id"] == new_node
    poll_until(lambda: not autoscaler_demand(), timeout_s=10, what="the demand withdrawn")


def test_a_wait_beyond_the_servers_most_is_refused(client: httpx.Client) -> None:
    response = create(client, wait_s=3000)
    assert response.status_code == 400
    assert "placement.max_wait_s" in response.json()["error"]["message"]


def test_the_trusted_pool_takes_admin_sandboxes_only(
    multinode: MultiNode, client: httpx.Client, namespace_key: Any
) -> None:
    trusted = multinode.add_sandbox_node(slots=2, labels={"cave.pool": "trusted"})
    asked = create(client, labels={"cave.pool": "trusted"})
    assert asked.status_code == 201, asked.text
    assert asked.json()["node_id"] == trusted
    for _ in range(3):  # sandboxes that ask for no pool never land there
        plain = create(client)
        assert plain.status_code == 201
        assert plain.json()["node_id"] != trusted

    with multinode.client(namespace_key("team-a", ["sandboxes:write"])) as team:
        refused = create(team, labels={"cave.pool": "trusted"})
    assert refused.status_code == 403
    assert "trusted" in refused.json()["error"]["message"]

    # A namespace an admin assigned to the pool places its sandboxes there without asking.
    assigned = client.put("/api/v1/admin/namespaces/team-t", json={"pool": "trusted"})
    assert assigned.status_code == 200
    with multinode.client(namespace_key("team-t", ["sandboxes:write"])) as team_t:
        placed = create(team_t)
    assert placed.status_code == 201, placed.text
    assert placed.json()["node_id"] == trusted
    assert placed.json()["labels"]["cave.pool"] == "trusted"


def test_an_inference_deployment_that_needs_a_gpu_lands_on_the_gpu_node(
    multinode: MultiNode,
) -> None:
    replicas = poll_until(
        lambda: [
            a
            for a in alive_actors()
            if a["ActorClassName"].startswith("ServeReplica") and GPU_MODEL in a["ActorClassName"]
        ],
        timeout_s=60,
        what="the engine replica",
    )
    assert {r["Address"]["NodeID"] for r in replicas} == {multinode.gpu_node}


@pytest.fixture
def namespace_key(multinode: MultiNode) -> Any:
    def make(namespace: str, scopes: list[str]) -> str:
        return make_namespace_key(multinode, namespace, scopes)

    return make


def test_a_create_that_stops_waiting_withdraws_its_demand(multinode: MultiNode) -> None:
    import asyncio

    from actors import remote
    from config.settings import load_settings

    settings = load_settings(env={})

    async def wait_then_give_up() -> None:
        # No node is in pool "nowhere": this create can only wait.
        waiting = asyncio.create_task(remote.reserve("gives-up", settings, "nowhere", wait_s=60))
        while not autoscaler_demand():
            assert not waiting.done(), waiting
            await asyncio.sleep(0.05)
        waiting.cancel()  # the caller went away
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(asyncio.wait_for(wait_then_give_up(), 30))
    poll_until(lambda: not autoscaler_demand(), timeout_s=10, what="the demand withdrawn")
