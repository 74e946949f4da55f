"""PostgreSQL only: row-level security holds for hand-written SQL; a lost connection is a 503."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import ProgrammingError

from cave.db import AuditEventRow, Database, NamespaceRow
from cave.errors import DatabaseUnavailableError, NamespaceMismatchError
from tests.db.conftest import Target, pg_execute

pytestmark = pytest.mark.anyio


@pytest.fixture
def backend() -> str:
    return "postgresql"


async def test_hand_written_sql_cannot_escape_the_namespace(
    two_namespaces: Database, target: Target
) -> None:
    async with two_namespaces.namespace_session("ns-a") as session:
        rows = (await session.execute(text("SELECT namespace_id, name FROM sandboxes"))).all()
        assert sorted(rows) == [("ns-a", "ns-a-1"), ("ns-a", "ns-a-2")]
        updated = await session.execute(text("UPDATE sandboxes SET name = 'x'"))
        assert updated.rowcount == 2  # type: ignore[attr-defined]
        deleted = await session.execute(text("DELETE FROM sandboxes WHERE namespace_id = 'ns-b'"))
        assert deleted.rowcount == 0  # type: ignore[attr-defined]
    with pytest.raises(NamespaceMismatchError):
        async with two_namespaces.namespace_session("ns-a") as session:
            await session.execute(
                text(
                    "INSERT INTO sandboxes (id, namespace_id, name, state, limits, labels,"
                    " created_at, updated_at) VALUES ('evil', 'ns-b', 'evil', 'new', '{}', '{}',"
                    " now(), now())"
                )
            )
    stored = await target.raw("SELECT id, name FROM sandboxes ORDER BY id")
    assert stored == [("ns-a-1", "x"), ("ns-a-2", "x"), ("ns-b-1", "ns-b-1"), ("ns-b-2", "ns-b-2")]


async def test_only_admin_and_the_namespace_see_rows(two_namespaces: Database) -> None:
    query = text("SELECT count(*) FROM sandboxes")
    async with two_namespaces.admin_session() as session:
        assert (await session.execute(query)).scalar() == 4
    async with two_namespaces.namespace_session("ns-b") as session:
        assert (await session.execute(query)).scalar() == 2
    async with two_namespaces.session() as session:
        assert (await session.execute(query)).scalar() == 0
        role = (await session.execute(text("SELECT current_user"))).scalar()
        assert role == "cave_app"


async def test_the_app_role_cannot_bypass_rls(db: Database, target: Target) -> None:
    rows = await target.raw(
        "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = 'cave_app'"
    )
    assert rows == [(False, False, False)]
    forced = await target.raw(
        "SELECT relname FROM pg_class WHERE relrowsecurity AND relforcerowsecurity"
        " AND relkind = 'r' ORDER BY relname"
    )
    assert [name for (name,) in forced] == [
        "api_keys",
        "audit_events",
        "executions",
        "key_rotation_events",
        "model_access_requests",
        "model_access_tokens",
        "namespaces",
        "outbox",
        "registered_models",
        "sandboxes",
        "signing_keys",
        "usage_events",
        "webhook_ids",
    ]


async def test_the_audit_trail_is_append_only(db: Database) -> None:
    async with db.admin_session() as session:
        session.add(AuditEventRow(seq=1, actor="admin", action="x", outcome="ok"))
    with pytest.raises(ProgrammingError, match="permission denied"):
        async with db.admin_session() as session:
            await session.execute(text("UPDATE audit_events SET outcome = 'forged'"))


async def test_a_connection_killed_mid_session_is_unavailable_and_writes_nothing(
    db: Database, target: Target
) -> None:
    with pytest.raises(DatabaseUnavailableError):
        async with db.admin_session() as session:
            session.add(NamespaceRow(id="ns-a", name="a"))
            await session.flush()
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar()
            await pg_execute("SELECT pg_terminate_backend($1)", pid)
            session.add(NamespaceRow(id="ns-b", name="b"))
            await session.flush()
    assert await target.raw("SELECT id FROM namespaces") == []
    async with db.admin_session() as session:  # the pool recovers on its own
        session.add(NamespaceRow(id="ns-c", name="c"))
    async with db.admin_session() as session:
        assert (await session.execute(select(NamespaceRow.id))).scalars().all() == ["ns-c"]
