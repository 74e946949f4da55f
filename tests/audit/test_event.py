"""AuditEvent: its id and timestamp, and what it refuses."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pytest

from cave.audit import AuditEvent
from cave.errors import InvalidArgumentError


def test_id_and_timestamp() -> None:
    before = datetime.now(UTC)
    event = AuditEvent("system", "sandbox.stop", "sbx_1")
    after = datetime.now(UTC)
    assert uuid.UUID(event.id).version == 4 and len(event.id) == 32
    assert event.ts.endswith("Z") and len(event.ts) == len("2026-11-27T09:15:02.123456Z")
    assert before <= datetime.fromisoformat(event.ts) <= after
    assert AuditEvent("system", "sandbox.stop", "sbx_1").id != event.id


def test_fields() -> None:
    event = AuditEvent("key_1", "key.rotate", "key_2", outcome="denied", details={"why": "scope"})
    assert event.fields() == {
        "id": event.id,
        "ts": event.ts,
        "actor": "key_1",
        "action": "key.rotate",
        "target": "key_2",
        "namespace": None,
        "outcome": "denied",
        "details": {"why": "scope"},
    }


def test_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="outcome 'maybe'"):
        AuditEvent("key_1", "sandbox.create", "sbx_1", outcome="maybe")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="actor and an action"):
        AuditEvent("", "sandbox.create", "sbx_1")
    event = AuditEvent("key_1", "sandbox.create", "sbx_1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.actor = "key_2"  # type: ignore[misc]
