"""What the API leaves behind, checked over real HTTP: execution records, audit events in the
database, and a signed JSONL audit log that `cave audit verify` accepts."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.main import main as cave_main
from tests.api.conftest import ApiServer
from tests.support import poll_until

DEADLINE_S = 30.0


def query(api_server: ApiServer, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(api_server.env["BKG_DB_PATH"]) as db:
        return db.execute(sql, args).fetchall()


def actions_on(api_server: ApiServer, target: str) -> set[str]:
    rows = query(api_server, "SELECT action FROM audit_events WHERE target = ?", target)
    return {str(action) for (action,) in rows}


def log_files(api_server: ApiServer) -> list[Path]:
    """The replicas' logs: each replica signs its own chain, `audit.<replica>.jsonl`."""
    return sorted(Path(api_server.env["CAVE_AUDIT_LOG_PATH"]).parent.glob("audit.*.jsonl"))


def logged(api_server: ApiServer) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in log_files(api_server):
        lines.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return lines


def test_exec_leaves_an_execution_record(api_server: ApiServer) -> None:
    with api_server.client() as client:
        sid = client.post("/api/v1/sandboxes", json={"name": "records"}).json()["id"]
        ran = client.post(
            f"/api/v1/sandboxes/{sid}/exec", json={"command": "printf out; printf errs >&2; exit 3"}
        ).json()
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204
    sql = (
        "SELECT sandbox_id, exit_code, stdout_bytes, stderr_bytes, output_sha256, timed_out,"
        " duration_ms FROM executions WHERE id = ?"
    )
    # Records are written in batches after the response: poll for this one.
    rows = poll_until(lambda: query(api_server, sql, ran["execution_id"]), DEADLINE_S, "record")
    sandbox_id, exit_code, out_bytes, err_bytes, digest, timed_out, duration_ms = rows[0]
    assert (sandbox_id, exit_code, out_bytes, err_bytes) == (sid, 3, 3, 4)
    joined = hashlib.sha256(b"out").digest() + hashlib.sha256(b"errs").digest()
    assert digest == hashlib.sha256(joined).hexdigest()
    assert not timed_out and duration_ms == ran["duration_ms"]


def test_lifecycle_and_keys_are_audited(
    api_server: ApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with api_server.client() as client:
        key = client.post(
            "/api/v1/auth/keys", json={"namespace": "records", "scopes": ["sandboxes:read"]}
        ).json()
        successor = client.post(f"/api/v1/auth/keys/{key['id']}/rotate", json={}).json()
        assert client.delete(f"/api/v1/auth/keys/{successor['id']}").status_code == 204
        sid = client.post("/api/v1/sandboxes", json={"name": "audited"}).json()["id"]
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert ran.status_code == 200
        client.post(f"/api/v1/sandboxes/{sid}/stop")
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204

    lifecycle = {
        "sandbox.create",
        "sandbox.start",
        "sandbox.exec",
        "sandbox.stop",
        "sandbox.delete",
    }
    poll_until(lambda: lifecycle <= actions_on(api_server, sid), DEADLINE_S, "sandbox events")
    assert {"key.create", "key.rotate"} <= actions_on(api_server, key["id"])
    assert "key.revoke" in actions_on(api_server, successor["id"])
    rotations = query(
        api_server,
        "SELECT details FROM audit_events WHERE action = 'key.rotate' AND target = ?",
        key["id"],
    )
    assert [json.loads(d)["new_key_id"] for (d,) in rotations] == [successor["id"]]

    # The same events reach the signed log, which verifies.
    def in_log() -> bool:
        seen = {(e.get("action"), e.get("target")) for e in logged(api_server)}
        return {(action, sid) for action in lifecycle} | {
            ("key.rotate", key["id"]),
            ("key.revoke", successor["id"]),
        } <= seen

    poll_until(in_log, DEADLINE_S, "events in the JSONL log")
    monkeypatch.setenv("CAVE_AUDIT_LOG_HMAC_KEY", api_server.env["CAVE_AUDIT_LOG_HMAC_KEY"])
    files = log_files(api_server)
    assert files
    for path in files:
        assert cave_main(["audit", "verify", str(path)]) == 0, capsys.readouterr().out
    assert "OK" in capsys.readouterr().out
