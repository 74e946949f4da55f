"""A redeploy of the API and the loss of a node, on the simulated cluster. Runs after
test_placement.py: losing a node is the last thing this cluster goes through."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.multinode.conftest import MultiNode
from tests.multinode.test_placement import alive_actors, create, exec_ok, stop_all_sandboxes
from tests.support import poll_until


def _is_api(actor: dict[str, Any]) -> bool:
    name = str(actor["ActorClassName"])
    return name.startswith("ServeReplica") and "ApiIngress" in name


def api_replicas() -> set[str]:
    return {a["ActorID"] for a in alive_actors() if _is_api(a)}


def test_a_rolling_redeploy_of_the_api_keeps_sandboxes_alive(multinode: MultiNode) -> None:
    from ray import serve

    from deployments.http.app import APP_NAME, build_app

    with multinode.client() as client:
        sandbox = create(client).json()
        exec_ok(client, sandbox["id"], "echo before > /tmp/mark")
        old = api_replicas()
        assert old

        env = {**multinode.env, "CAVE_REDEPLOY_MARK": "2"}  # a new version of the app
        serve.run(build_app({"env": env, "models": []}), name=APP_NAME, route_prefix="/")
        poll_until(lambda: api_replicas() and not api_replicas() & old, timeout_s=120)
        poll_until(lambda: client.get("/readyz").status_code == 200, timeout_s=60)

        out = exec_ok(client, sandbox["id"], "cat /tmp/mark")
        assert out["stdout"].strip() == "before"  # the same sandbox, its files kept
        assert client.get(f"/api/v1/sandboxes/{sandbox['id']}").json()["state"] == "running"
        stop_all_sandboxes(client)


def execution_counts(multinode: MultiNode) -> dict[str, int]:
    """Executions recorded per sandbox, read from the database itself."""
    import asyncio

    from sqlalchemy import func, select

    from cave.db import Database, ExecutionRow, load_database_settings

    async def read() -> dict[str, int]:
        db = await Database.connect(load_database_settings(multinode.env))
        try:
            async with db.read_session(None) as session:
                query = select(ExecutionRow.sandbox_id, func.count()).group_by(
                    ExecutionRow.sandbox_id
                )
                return {sid: n for sid, n in (await session.execute(query)).all()}
        finally:
            await db.close()

    return asyncio.run(read())


def test_losing_a_node_loses_exactly_its_sandboxes(multinode: MultiNode) -> None:
    with multinode.client() as client:
        created = [create(client).json() for _ in range(4)]
        for sandbox in created:
            exec_ok(client, sandbox["id"])
        # Exec records are committed in batches just after the response (CAVE_EXEC_RECORDS=
        # async): what must outlive the node is what was committed before it went.
        poll_until(
            lambda: all(execution_counts(multinode).get(s["id"]) for s in created),
            timeout_s=10,
            what="the executions recorded",
        )
        by_node = Counter(s["node_id"] for s in created)
        # The hardest node to lose: the one an API replica runs on too, when there is one.
        candidates = [n for n in multinode.sandbox_nodes if by_node[n]]
        api_nodes = {a["Address"]["NodeID"] for a in alive_actors() if _is_api(a)}
        doomed = next((n for n in candidates if n in api_nodes), candidates[0])
        print(f"losing node {doomed}, which runs an API replica: {doomed in api_nodes}")
        on_doomed = {s["id"] for s in created if s["node_id"] == doomed}
        others = [s for s in created if s["id"] not in on_doomed]

        multinode.cluster.remove_node(multinode.sandbox_nodes[doomed], allow_graceful=False)

        def states() -> dict[str, str]:
            """Each sandbox's state; empty while the API does not answer: an API replica on the
            lost node is gone too, until Serve has started it again elsewhere."""
            answers = [client.get(f"/api/v1/sandboxes/{s['id']}") for s in created]
            if any(a.status_code != 200 for a in answers):
                return {}
            return {s["id"]: a.json()["state"] for s, a in zip(created, answers, strict=True)}

        poll_until(
            lambda: (now := states()) and all(now[sid] == "lost" for sid in on_doomed),
            timeout_s=90,
            what="the dead node's sandboxes marked lost",
        )
        assert all(states()[s["id"]] == "running" for s in others)
        for sandbox in others:
            exec_ok(client, sandbox["id"])
        lost = client.get(f"/api/v1/sandboxes/{next(iter(on_doomed))}").json()
        assert "node died" in lost["failure"]

        metrics = client.get("/metrics").text
        assert _gauge(metrics, 'cave_sandboxes{state="lost"}') >= len(on_doomed)

        again = create(client)
        assert again.status_code == 201
        assert again.json()["node_id"] != doomed
        stop_all_sandboxes(client)


def _gauge(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_a_lost_sandboxs_record_and_history_stay(multinode: MultiNode) -> None:
    with multinode.client() as client:
        lost = client.get("/api/v1/sandboxes", params={"state": "lost"}).json()["items"]
    assert lost
    counts = execution_counts(multinode)
    assert all(counts.get(s["id"], 0) >= 1 for s in lost)
