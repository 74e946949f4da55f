"""Sandboxes that end on their own, over real HTTP: ttl, idle timeout, an actor killed behind
the API's back (upkeep runs every 0.2 s in tests, the reconciler every fifth tick)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import httpx
import ray

from actors.sandboxes import get_sandbox
from tests.api.conftest import ApiServer
from tests.support import poll_until

DEADLINE_S = 30.0


def state_becomes(client: httpx.Client, sandbox_id: str, state: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/api/v1/sandboxes/{sandbox_id}").json()
        return body if body["state"] == state else None

    body: dict[str, Any] | None = poll_until(
        reached, DEADLINE_S, f"sandbox {sandbox_id} {state}", every_s=0.1
    )
    assert body is not None
    return body


def stop_reasons(api_server: ApiServer, sandbox_id: str) -> list[str]:
    with sqlite3.connect(api_server.env["BKG_DB_PATH"]) as db:
        rows = db.execute(
            "SELECT details FROM audit_events WHERE target = ? AND action = 'sandbox.stop'",
            (sandbox_id,),
        ).fetchall()
    return [str(json.loads(details)["reason"]) for (details,) in rows]


def key_refused(api_server: ApiServer, key: str, sandbox_id: str) -> bool:
    """The sandbox's own key is refused: 401, as for any revoked key."""
    with api_server.client(key) as own:
        return own.get(f"/api/v1/sandboxes/{sandbox_id}").status_code == 401


def test_ttl_stops_the_sandbox(api_server: ApiServer) -> None:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "ttl", "ttl_s": 1}).json()
        assert created["expires_at"] is not None
        sid = created["id"]
        stopped = state_becomes(client, sid, "stopped")
        assert stopped["stopped_at"] is not None
        # Expiry revokes its key, just after the state changes: poll for it.
        poll_until(lambda: key_refused(api_server, created["api_key"], sid), 10, "key revoked")
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert ran.status_code == 409
        assert ran.json()["error"]["code"] == "sandbox_state"
        # The audit event follows the state change: poll for it.
        assert poll_until(lambda: stop_reasons(api_server, sid), 10, "audit") == ["ttl"]
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204


def test_idle_timeout_spares_a_running_exec_then_stops(api_server: ApiServer) -> None:
    with api_server.client() as client:
        body = {"name": "idle", "idle_timeout_s": 1}
        created = client.post("/api/v1/sandboxes", json=body).json()
        sid = created["id"]
        assert created["idle_timeout_s"] == 1
        # Longer than the idle timeout: an exec that runs is activity, however long it takes.
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "sleep 2; echo done"})
        assert ran.status_code == 200, ran.text
        assert (ran.json()["exit_code"], ran.json()["stdout"]) == (0, "done\n")
        state_becomes(client, sid, "stopped")
        assert poll_until(lambda: stop_reasons(api_server, sid), 10, "audit") == ["idle"]
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert ran.status_code == 409
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204


def test_killed_actor_makes_the_sandbox_lost(api_server: ApiServer) -> None:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "doomed"}).json()
        sid = created["id"]
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "echo alive"})
        assert ran.json()["stdout"] == "alive\n"
        ray.kill(get_sandbox(sid).actor.actor)
        lost = state_becomes(client, sid, "lost")
        assert lost["failure"], lost
        poll_until(lambda: key_refused(api_server, created["api_key"], sid), 10, "key revoked")
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert ran.status_code == 409
        assert ran.json()["error"]["code"] == "sandbox_state"
        # A lost sandbox can be started afresh.
        restarted = client.post(f"/api/v1/sandboxes/{sid}/start")
        assert (restarted.status_code, restarted.json()["state"]) == (200, "running")
        assert restarted.json()["failure"] is None
        with api_server.client(restarted.json()["api_key"]) as own:  # a new key, shown once
            assert own.get(f"/api/v1/sandboxes/{sid}").status_code == 200
        again = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "echo back"})
        assert again.json()["stdout"] == "back\n"
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204
