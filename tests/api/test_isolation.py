"""Each sandbox's isolation over the real API: SandboxOut, /readyz, /metrics and the client."""

from __future__ import annotations

import secrets

from cave.client import Cave
from tests.api.conftest import ApiServer

FULL = {"namespaces": True, "seccomp": True, "cgroups": True, "overlayfs": True}


def test_a_started_sandbox_reports_full_isolation_from_its_actor(api_server: ApiServer) -> None:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": f"iso-{secrets.token_hex(3)}"})
        assert created.status_code == 201, created.text
        sandbox = created.json()
        try:
            assert sandbox["isolation"] == {
                "backend": "builtin",
                "guarantees": FULL,
                "degraded": False,
                "reason": None,
            }
            got = client.get(f"/api/v1/sandboxes/{sandbox['id']}").json()
            assert got["isolation"] == sandbox["isolation"]  # kept on its record
        finally:
            client.delete(f"/api/v1/sandboxes/{sandbox['id']}")
        never = client.post("/api/v1/sandboxes", json={"start": False}).json()
        assert never["isolation"] is None  # never started: nothing to claim
        client.delete(f"/api/v1/sandboxes/{never['id']}")


def test_the_python_client_shows_the_isolation(api_server: ApiServer) -> None:
    with Cave(api_server.url, api_server.admin_key) as cave:
        sandbox = cave.sandboxes.create(name=f"iso-client-{secrets.token_hex(3)}")
        try:
            isolation = sandbox.info.isolation
            assert isolation is not None and isolation.backend == "builtin"
            assert not isolation.degraded and isolation.guarantees.cgroups
        finally:
            sandbox.delete()


def test_readiness_and_metrics_report_each_nodes_isolation(api_server: ApiServer) -> None:
    with api_server.client() as client:
        ready = client.get("/readyz")
        metrics = client.get("/metrics").text
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["checks"]["isolation"] == "ok"
    assert body["isolation"] and all(
        node["guarantees"] == FULL and not node["degraded"] for node in body["isolation"].values()
    )
    node = next(iter(body["isolation"]))
    for guarantee in FULL:
        line = (
            f'cave_isolation_guarantee{{backend="builtin",guarantee="{guarantee}",'
            f'node_id="{node}"}} 1.0'
        )
        assert line in metrics, guarantee
    assert "cave_sandboxes_degraded 0.0" in metrics
    assert "cave_isolation_refusing_nodes 0.0" in metrics
