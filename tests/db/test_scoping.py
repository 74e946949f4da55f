"""Tests of namespace scoping through the ORM, the same on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from cave.db import (
    ApiKeyRow,
    Database,
    NamespaceRow,
    OutboxRow,
    SandboxRow,
    Scope,
    scope_of,
)
from cave.errors import NamespaceMismatchError

pytestmark = pytest.mark.anyio


async def test_a_namespace_session_reads_only_its_rows(two_namespaces: Database) -> None:
    async with two_namespaces.namespace_session("ns-a") as session:
        assert scope_of(session) == Scope(namespace_id="ns-a")
        names = (await session.execute(select(SandboxRow.name))).scalars().all()
        assert sorted(names) == ["ns-a-1", "ns-a-2"]
        assert await session.get(SandboxRow, "ns-b-1") is None
        namespaces = (await session.execute(select(NamespaceRow.id))).scalars().all()
        assert namespaces == ["ns-a"]
        assert (await session.execute(select(ApiKeyRow))).first() is None  # admin keys hidden


async def test_a_namespace_session_changes_only_its_rows(two_namespaces: Database) -> None:
    async with two_namespaces.namespace_session("ns-a") as session:
        await session.execute(update(SandboxRow).values(state="stopped"))
    async with two_namespaces.admin_session() as session:
        rows = (await session.execute(select(SandboxRow.id, SandboxRow.state))).all()
    assert sorted(rows) == [
        ("ns-a-1", "stopped"),
        ("ns-a-2", "stopped"),
        ("ns-b-1", "running"),
        ("ns-b-2", "running"),
    ]


async def test_a_namespace_session_cannot_write_another_namespace(
    two_namespaces: Database,
) -> None:
    with pytest.raises(NamespaceMismatchError):
        async with two_namespaces.namespace_session("ns-a") as session:
            session.add(SandboxRow(id="sneaky", namespace_id="ns-b", name="x", state="new"))
    with pytest.raises(NamespaceMismatchError):
        async with two_namespaces.namespace_session("ns-a") as session:
            box = await session.get(SandboxRow, "ns-a-1")
            assert box is not None
            box.namespace_id = "ns-b"  # moving a row out is writing into ns-b
    async with two_namespaces.admin_session() as session:
        assert await session.get(SandboxRow, "sneaky") is None
        moved = await session.get(SandboxRow, "ns-a-1")
        assert moved is not None and moved.namespace_id == "ns-a"


async def test_admin_sees_everything(two_namespaces: Database) -> None:
    async with two_namespaces.admin_session() as session:
        total = (await session.execute(select(func.count()).select_from(SandboxRow))).scalar()
        keys = (await session.execute(select(ApiKeyRow.prefix))).scalars().all()
    assert total == 4 and keys == ["cave_admin_1"]


async def test_a_plain_session_acts_for_nobody(two_namespaces: Database) -> None:
    async with two_namespaces.session() as session:
        assert (await session.execute(select(SandboxRow))).first() is None
        assert (await session.execute(select(ApiKeyRow))).first() is None
    with pytest.raises(NamespaceMismatchError):
        async with two_namespaces.session() as session:
            session.add(ApiKeyRow(kind="admin", prefix="cave_admin_2", secret_hash="h"))


async def test_anyone_enqueues_only_the_admin_reads_the_outbox(db: Database) -> None:
    async with db.namespace_session("ns-a") as session:
        session.add(OutboxRow(event_id="evt-1", topic="key.rotated", payload={"key": "k"}))
        await session.flush()
        assert (await session.execute(select(OutboxRow))).first() is None
    async with db.session() as session:
        session.add(OutboxRow(event_id="evt-2", topic="key.rotated", payload={}))
    async with db.admin_session() as session:
        events = (await session.execute(select(OutboxRow.event_id))).scalars().all()
    assert sorted(events) == ["evt-1", "evt-2"]
