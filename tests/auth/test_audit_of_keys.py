"""Every key action leaves an audit event in the database and a verifiable line in the JSONL log."""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path

import pytest
from sqlalchemy import select

from cave.audit import load_audit_settings, open_audit_log, verify
from cave.audit.trail import AuditTrail
from cave.auth.keys import KeyService
from cave.auth.settings import AuthSettings
from cave.db import AuditEventRow, Database, NamespaceRow

pytestmark = pytest.mark.anyio


async def test_create_rotate_revoke_are_audited_in_both_places(
    db: Database, auth_settings: AuthSettings, tmp_path: Path
) -> None:
    key = secrets.token_bytes(32)
    settings = load_audit_settings(
        {
            "CAVE_AUDIT_LOG_ENABLED": "true",
            "CAVE_AUDIT_LOG_PATH": str(tmp_path / "audit.jsonl"),
            "CAVE_AUDIT_LOG_HMAC_KEY": base64.b64encode(key).decode().rstrip("="),
        }
    )
    log = open_audit_log(settings)
    assert log is not None
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="ns-a", name="a"))
    keys = KeyService(db, auth_settings, AuditTrail(db, log))
    try:
        info, _ = await keys.create("namespace", "ns-a", ["sandboxes:read"], actor="admin-1")
        await keys.rotate(info.id, actor="admin-1")
        await keys.revoke(info.id, actor="admin-1")
    finally:
        log.close()
    async with db.admin_session() as session:
        rows = (await session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq))).all()
    assert [(r.seq, r.action, r.target, r.actor, r.namespace_id) for r in rows] == [
        (1, "key.create", info.id, "admin-1", "ns-a"),
        (2, "key.rotate", info.id, "admin-1", "ns-a"),
        (3, "key.revoke", info.id, "admin-1", "ns-a"),
    ]
    result = verify([tmp_path / "audit.jsonl"], key)
    assert result.ok and result.lines_checked == 3


async def test_concurrent_records_get_distinct_gap_free_seqs(db: Database) -> None:
    from cave.audit import AuditEvent

    trail = AuditTrail(db)
    seqs = await asyncio.gather(
        *(trail.record(AuditEvent("system", "test.event", str(i))) for i in range(12))
    )
    assert sorted(seqs) == list(range(1, 13))


async def test_scrubbing_masks_secrets_in_stored_details(db: Database) -> None:
    from cave.audit import AuditEvent

    trail = AuditTrail(db, scrub_details=True)
    await trail.record(
        AuditEvent(
            "system",
            "test.event",
            "alice@example.com",
            details={"client_ip": "10.1.2.3", "note": "ok"},
        )
    )
    async with db.admin_session() as session:
        row = (await session.scalars(select(AuditEventRow))).one()
    assert "alice" not in row.target and "10.1.2.3" not in str(row.details)
    assert row.details["note"] == "ok"
