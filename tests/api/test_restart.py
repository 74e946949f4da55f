"""An API restart does not touch the sandboxes: new replicas find the running actors through the
directory. The session's app is put back as it was at the end, whatever the order of modules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import ApiServer, redeploy
from tests.support import poll_until

# Not a setting anyone reads: a changed deployment argument is what makes Serve replace replicas.
MARKER = "TEST_RESTART_GENERATION"


def audit_logs(api_server: ApiServer) -> set[Path]:
    """Each replica signs its own log, `audit.<replica>.jsonl`: a new file is a new replica."""
    return set(Path(api_server.env["CAVE_AUDIT_LOG_PATH"]).parent.glob("audit.*.jsonl"))


def logged_exec(paths: set[Path], sandbox_id: str) -> bool:
    for path in paths:
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if (event.get("action"), event.get("target")) == ("sandbox.exec", sandbox_id):
                return True
    return False


@pytest.fixture
def sandbox_id(api_server: ApiServer) -> Iterator[str]:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "survivor"})
        assert created.status_code == 201, created.text
        sid = str(created.json()["id"])
        written = client.put(f"/api/v1/sandboxes/{sid}/files/kept.txt", content=b"kept")
        assert written.status_code == 200
        # Remembered by the replica about to go: the new one has to find it on its own.
        assert client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "true"}).is_success
        yield sid
        client.delete(f"/api/v1/sandboxes/{sid}")


def test_sandbox_survives_api_restart(api_server: ApiServer, sandbox_id: str) -> None:
    old_logs = audit_logs(api_server)
    redeploy(api_server, {**api_server.env, MARKER: "2"})
    try:
        with api_server.client() as client:
            sandbox = client.get(f"/api/v1/sandboxes/{sandbox_id}").json()
            assert sandbox["state"] == "running"
            ran = client.post(
                f"/api/v1/sandboxes/{sandbox_id}/exec", json={"command": "cat kept.txt"}
            )
            assert ran.status_code == 200, ran.text
            assert ran.json()["stdout"] == "kept"
            assert client.get(f"/api/v1/sandboxes/{sandbox_id}/files/kept.txt").content == b"kept"
        # The exec was served, and audited, by a replica that did not exist before.
        poll_until(
            lambda: logged_exec(audit_logs(api_server) - old_logs, sandbox_id),
            30,
            "the exec in a new replica's audit log",
        )
    finally:
        redeploy(api_server, api_server.env)
    with api_server.client() as client:
        stopped = client.post(f"/api/v1/sandboxes/{sandbox_id}/stop")
        assert stopped.json()["state"] == "stopped"
