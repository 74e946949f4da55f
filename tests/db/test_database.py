"""Tests of Database sessions: one commit per block, rollback on error, errors in the CAVE tree."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, StatementError

from cave.db import (
    Database,
    ExecutionRow,
    NamespaceRow,
    SandboxRow,
    load_database_settings,
    translate_errors,
)
from cave.errors import (
    ConfigError,
    ConflictError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    OverloadedError,
)

pytestmark = pytest.mark.anyio


async def _count(db: Database, row: type[NamespaceRow] | type[SandboxRow]) -> int:
    async with db.admin_session() as session:
        return (await session.execute(select(func.count()).select_from(row))).scalar_one()


async def test_a_session_commits_once_at_the_end(db: Database) -> None:
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="ns-a", name="a"))
        await session.flush()
        session.add(SandboxRow(namespace_id="ns-a", name="box", state="running"))
    assert await _count(db, SandboxRow) == 1


async def test_a_session_that_fails_midway_writes_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError, match="boom"):  # our own errors pass through unchanged
        async with db.admin_session() as session:
            session.add(NamespaceRow(id="ns-a", name="a"))
            await session.flush()
            session.add(SandboxRow(namespace_id="ns-a", name="box", state="running"))
            await session.flush()
            raise RuntimeError("boom")
    assert await _count(db, NamespaceRow) == 0
    assert await _count(db, SandboxRow) == 0


async def test_duplicate_namespace_name_is_a_conflict(db: Database) -> None:
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="ns-a", name="team"))
    with pytest.raises(ConflictError) as caught:
        async with db.admin_session() as session:
            session.add(NamespaceRow(id="ns-other", name="unrelated"))
            await session.flush()
            session.add(NamespaceRow(id="ns-b", name="team"))
    assert "name" in str(caught.value)
    assert "INSERT" not in str(caught.value)  # the driver's words, not our SQL
    async with db.admin_session() as session:
        ids = (await session.execute(select(NamespaceRow.id))).scalars().all()
    assert ids == ["ns-a"]  # the unrelated row of the failed transaction is gone too


async def test_unknown_foreign_key_is_a_conflict(db: Database) -> None:
    with pytest.raises(ConflictError):
        async with db.admin_session() as session:
            session.add(SandboxRow(namespace_id="nowhere", name="box", state="new"))


async def test_an_execution_cannot_cross_namespaces(db: Database) -> None:
    async with db.admin_session() as session:
        session.add_all([NamespaceRow(id="ns-a", name="a"), NamespaceRow(id="ns-b", name="b")])
        await session.flush()
        session.add(SandboxRow(id="box-a", namespace_id="ns-a", name="box", state="running"))
    with pytest.raises(ConflictError):
        async with db.admin_session() as session:
            session.add(ExecutionRow(sandbox_id="box-a", namespace_id="ns-b", command=["true"]))


async def test_timestamps_and_json_round_trip(db: Database) -> None:
    started = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="ns-a", name="a"))
        await session.flush()
        session.add(
            SandboxRow(
                id="box",
                namespace_id="ns-a",
                name="b",
                state="running",
                limits={"memory_mb": 512, "cpu": 1.5},
                labels={"team": "x"},
            )
        )
        await session.flush()
        session.add(
            ExecutionRow(
                sandbox_id="box",
                namespace_id="ns-a",
                command=["python", "-c", "print(1)"],
                started_at=started,
            )
        )
    async with db.admin_session() as session:
        row = (await session.execute(select(ExecutionRow))).scalar_one()
        box = await session.get(SandboxRow, "box")
    assert row.started_at == started and row.started_at.tzinfo == UTC
    assert row.command == ["python", "-c", "print(1)"]
    assert box is not None and box.limits == {"memory_mb": 512, "cpu": 1.5}
    assert box.created_at.tzinfo == UTC and box.labels == {"team": "x"}


async def test_naive_datetimes_are_refused(db: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with db.admin_session() as session:
            session.add(NamespaceRow(id="ns-a", name="a", created_at=datetime(2025, 1, 1)))


async def test_empty_namespace_is_refused(db: Database) -> None:
    with pytest.raises(InvalidArgumentError):
        db.namespace_session("")


async def test_unreachable_database_is_a_clear_error(backend: str, tmp_path: Path) -> None:
    if backend == "sqlite":
        (tmp_path / "db").mkdir()  # a directory where the file should be
        env = {"BKG_DB_PATH": str(tmp_path / "db")}
        where, why = str(tmp_path / "db"), "unable to open database file"
    else:
        env = {"BKG_DB_DSN": "postgresql://postgres@127.0.0.1:1/test"}
        where, why = "127.0.0.1:1/test", "Connect call failed"
    with pytest.raises(DatabaseUnavailableError) as caught:
        await Database.connect(load_database_settings(env))
    message = str(caught.value)
    assert message.startswith("cannot connect to") and where in message and why in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no traceback
    await _aiosqlite_threads_finished()


async def _aiosqlite_threads_finished(deadline_s: float = 5.0) -> None:
    # aiosqlite stops its thread after a failed connect without waiting for it; let it finish
    # while this test's event loop still runs, or it reports into a closed loop.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while any("_connection_worker_thread" in t.name for t in threading.enumerate()):
        assert loop.time() < deadline, "aiosqlite worker thread did not stop"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("postgresql://postgres@127.0.0.1:5432/cave_no_such_db", 'database "cave_no_such_db"'),
        ("postgresql://cave_no_such_user@127.0.0.1:5432/test", 'role "cave_no_such_user"'),
    ],
)
async def test_bad_database_or_credentials_are_a_clear_error(
    dsn: str, reason: str, pg_database: str
) -> None:
    with pytest.raises(DatabaseUnavailableError) as caught:
        await Database.connect(load_database_settings({"BKG_DB_DSN": dsn}))
    assert "127.0.0.1:5432" in str(caught.value) and reason in str(caught.value)


async def test_sqlite_directory_that_cannot_be_made_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = load_database_settings({"BKG_DB_PATH": str(tmp_path / "file" / "cave.db")})
    with pytest.raises(ConfigError, match="^BKG_DB_PATH="):
        await Database.connect(settings)


def _integrity() -> IntegrityError:
    return IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed: namespaces.name"))


def test_translate_errors_as_context_manager() -> None:
    with (
        pytest.raises(ConflictError, match="UNIQUE constraint failed: namespaces.name$"),
        translate_errors(),
    ):
        raise _integrity()
    # Another process held SQLite's write lock past the busy timeout: load (429), not an outage.
    with pytest.raises(OverloadedError, match="database is locked"), translate_errors():
        raise OperationalError("BEGIN", {}, Exception("database is locked"))
    with pytest.raises(DatabaseUnavailableError, match="disk I/O error"), translate_errors():
        raise OperationalError("BEGIN", {}, Exception("disk I/O error"))
    # A bug in our SQL stays visible as what it is.
    with pytest.raises(ProgrammingError), translate_errors():
        raise ProgrammingError("SELEC 1", {}, Exception("syntax error"))
    # So does the caller's own trouble: not every OSError is a database outage.
    with pytest.raises(FileNotFoundError), translate_errors():
        raise FileNotFoundError("/no/such/file")


async def test_translate_errors_as_decorator() -> None:
    @translate_errors()
    async def lost() -> None:
        raise ConnectionResetError("connection reset by peer")

    @translate_errors()
    def conflict() -> None:
        raise _integrity()

    with pytest.raises(DatabaseUnavailableError, match="reset by peer"):
        await lost()
    with pytest.raises(ConflictError):
        conflict()
