"""The sandbox lifecycle over real HTTP: create, exec, files, stop, start, delete."""

from __future__ import annotations

from tests.api.conftest import ApiServer


def test_create_exec_stop_delete(api_server: ApiServer) -> None:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "first", "labels": {"a": "b"}})
        assert created.status_code == 201, created.text
        sandbox = created.json()
        assert sandbox["state"] == "running"
        assert sandbox["api_key"].startswith("cave_live_")
        sid = sandbox["id"]
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "echo hi; exit 3"})
        assert ran.status_code == 200, ran.text
        assert ran.json()["stdout"] == "hi\n"
        assert ran.json()["exit_code"] == 3
        stopped = client.post(f"/api/v1/sandboxes/{sid}/stop")
        assert stopped.json()["state"] == "stopped"
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204
        assert client.get(f"/api/v1/sandboxes/{sid}").status_code == 404
