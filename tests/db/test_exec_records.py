"""Exec records (deployments/sandboxes/exec_records.py) on SQLite and PostgreSQL: an argv that
is not UTF-8 is stored losslessly, one bad record never rolls back the others, and no exec loses
its audit event."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cave.audit.event import AuditEvent
from cave.audit.trail import AuditTrail
from cave.auth.bootstrap import create_admin_key
from cave.db import Database, ExecutionRow, NamespaceRow, SandboxRow, new_id, utcnow
from deployments.http.services import Services
from deployments.sandboxes.exec_records import ExecRecorder, command_of, stored_command
from deployments.schemas import CreateSandboxRequest, ExecRequest
from tests.db.conftest import Target

# A non-UTF-8 byte as Python and our JSON carry it (surrogateescape): "\udcff" is the byte 0xff.
ODD = "x\udcff"
ODD_ARGV = ["sh", "-c", 'printf "%s|%s" "$1" "$ODD"', "sh", ODD]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_stored_command_round_trips() -> None:
    argv = ["plain", "é", ODD, "\udc80\udcff", ""]
    stored = stored_command(argv)
    assert stored[:2] == ["plain", "é"] and stored[4] == ""
    assert stored[2] == {"b64": "eP8="}  # b"x\xff"
    assert json.loads(json.dumps(stored, ensure_ascii=False).encode()) == stored
    assert command_of(stored) == argv


@pytest.fixture
async def services(
    ray_cluster: None, cave_state_dir: Path, target: Target, tmp_path: Path
) -> AsyncIterator[tuple[Services, str]]:
    """One API replica's services on the test's database (async exec records: batches), and
    an admin key."""
    env = {
        **target.env,
        "CAVE_SECRETS_DIR": str(tmp_path / "secrets"),
        "CAVE_STATE_DIR": str(cave_state_dir),
        "CAVE_POOL_SIZE": "0",
        "CAVE_AUDIT_LOG_ENABLED": "false",
        "CAVE_EXEC_RECORDS": "async",
    }
    if "BKG_DB_DSN" in env:
        env["BKG_DB_PATH"] = ""
    key = await create_admin_key({**os.environ, **env})  # migrates the database first
    started = await Services.start(env)
    try:
        yield started, key
    finally:
        await started.close()


@pytest.mark.anyio
async def test_two_tenants_exec_at_once_one_with_a_lone_surrogate(
    services: tuple[Services, str], target: Target
) -> None:
    started, key = services
    admin = await started.authenticate(f"Bearer {key}")
    manager = started.sandboxes
    created = await asyncio.gather(
        *(
            manager.create(admin, CreateSandboxRequest(name=ns, namespace=ns))
            for ns in ("tenant-odd", "tenant-plain")
        )
    )
    odd_sid, plain_sid = (sandbox.id for sandbox in created)
    try:
        odd, plain = await asyncio.gather(
            manager.run(admin, odd_sid, ExecRequest(command=ODD_ARGV, env={"ODD": ODD})),
            manager.run(admin, plain_sid, ExecRequest(command=["echo", "plain"])),
        )
        # The command received the bytes: x\xff, twice (argument and environment).
        assert (odd.exit_code, odd.stdout) == (0, "x\ufffd|x\ufffd")
        assert (plain.exit_code, plain.stdout) == (0, "plain\n")
        await manager.recorder.close()  # writes the batch the two records are queued in
    finally:
        for sid in (odd_sid, plain_sid):
            await manager.delete(admin, sid)

    rows = await target.raw("SELECT id, namespace_id, command FROM executions")
    commands = {row[0]: (row[1], _json(row[2])) for row in rows}
    assert commands[odd.execution_id][0] == "tenant-odd"
    assert command_of(commands[odd.execution_id][1]) == ODD_ARGV
    assert commands[plain.execution_id] == ("tenant-plain", ["echo", "plain"])
    events = await target.raw("SELECT details FROM audit_events WHERE action = 'sandbox.exec'")
    audited = {_json(details)["execution_id"] for (details,) in events}
    assert {odd.execution_id, plain.execution_id} <= audited


async def _tenant(database: Database, namespace: str) -> str:
    sandbox_id = f"sbx-{namespace}"
    async with database.admin_session() as session:
        session.add(NamespaceRow(id=namespace, name=namespace))
        await session.flush()
        session.add(SandboxRow(id=sandbox_id, namespace_id=namespace, name="s", state="running"))
    return sandbox_id


def _execution(sandbox_id: str, namespace: str, argv: list[str]) -> ExecutionRow:
    return ExecutionRow(
        id=new_id(),
        sandbox_id=sandbox_id,
        namespace_id=namespace,
        command=argv,
        exit_code=0,
        started_at=utcnow(),
        duration_ms=1,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_bad_record_in_a_batch_never_takes_the_others(
    db: Database, target: Target, mode: str
) -> None:
    """A record the database refuses (its sandbox does not exist) among ten good ones: the good
    ones are stored, and the bad one's audit event too, saying why its record is missing."""
    good_sid = await _tenant(db, "good")
    recorder = ExecRecorder(AuditTrail(db), mode)  # type: ignore[arg-type]
    items: list[tuple[AuditEvent, ExecutionRow]] = []
    for i in range(11):
        sid, namespace = ("no-such-sandbox", "good") if i == 5 else (good_sid, "good")
        row = _execution(sid, namespace, ["echo", str(i), ODD])
        details = {"execution_id": row.id}
        event = AuditEvent("key", "sandbox.exec", sid, namespace=namespace, details=details)
        items.append((event, row))
    outcomes = await asyncio.gather(
        *(recorder.record(event, row) for event, row in items), return_exceptions=True
    )
    await recorder.close()
    bad_id = items[5][1].id
    if mode == "sync":  # the caller waiting for the bad record hears of it, nobody else does
        assert [i for i, o in enumerate(outcomes) if o is not None] == [5]
    stored = {row[0] for row in await target.raw("SELECT id FROM executions")}
    assert stored == {row.id for _, row in items} - {bad_id}
    events = await target.raw("SELECT details FROM audit_events WHERE action = 'sandbox.exec'")
    details = {_json(d)["execution_id"]: _json(d) for (d,) in events}
    assert set(details) == {row.id for _, row in items}
    assert "record_error" in details[bad_id]
    assert all("record_error" not in d for i, d in details.items() if i != bad_id)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
