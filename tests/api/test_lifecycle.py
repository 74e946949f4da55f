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


def test_a_sandbox_key_ends_with_a_stop_and_a_start_hands_out_a_new_one(
    api_server: ApiServer,
) -> None:
    with api_server.client() as admin:
        created = admin.post("/api/v1/sandboxes", json={"name": "keyed"}).json()
        sid, first = created["id"], created["api_key"]
        exec_path = f"/api/v1/sandboxes/{sid}/exec"
        with api_server.client(first) as own:
            assert own.post(exec_path, json={"command": "true"}).status_code == 200
            assert admin.post(f"/api/v1/sandboxes/{sid}/stop").json()["state"] == "stopped"
            refused = own.get(f"/api/v1/sandboxes/{sid}")
            assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
        started = admin.post(f"/api/v1/sandboxes/{sid}/start")
        assert started.status_code == 200, started.text
        second = started.json()["api_key"]
        assert second and second != first
        assert started.json()["api_key_masked"].split("_")[2] == second.split("_")[2]
        with api_server.client(second) as own:
            ran = own.post(exec_path, json={"command": "echo again"})
            assert ran.json()["stdout"] == "again\n"
            with api_server.client(first) as old:
                assert old.post(exec_path, json={"command": "true"}).status_code == 401
            # Starting what runs already hands out nothing: the key shown once stays valid.
            assert admin.post(f"/api/v1/sandboxes/{sid}/start").json()["api_key"] is None
            assert admin.delete(f"/api/v1/sandboxes/{sid}").status_code == 204
            assert own.post(exec_path, json={"command": "true"}).status_code == 401
