"""Writes under load: a burst of writers all commit; a writer that cannot get its turn in time is
refused as overload (429, with when to retry), never as a database failure (503); nothing is lost.

On SQLite the writers of one process queue for the file's one write lock in order (not by polling
SQLite's busy handler, which a burst outwaits: "database is locked"); writers of several processes
(API replicas) meet at the file's lock under the busy timeout. On PostgreSQL a writer queues for a
pooled connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cave.db import Database, NamespaceRow, admitted
from cave.errors import DatabaseUnavailableError, OverloadedError, QuotaExceededError
from tests.db.conftest import Target

pytestmark = pytest.mark.anyio
BURST = 300


async def _insert(db: Database, name: str) -> None:
    async with db.admin_session() as session:
        session.add(NamespaceRow(id=name, name=name))


async def _count(db: Database) -> int:
    async with db.read_session(None) as session:
        return int(await session.scalar(select(func.count()).select_from(NamespaceRow)) or 0)


async def _long_write(db: Database, holding: asyncio.Event, release: asyncio.Event) -> None:
    """Another request's write (the namespace "slow"), holding the write turn or a pooled
    connection from `holding` until `release`."""
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="slow", name="slow"))
        await session.flush()
        holding.set()
        await release.wait()


async def test_a_burst_of_writers_from_two_replicas_all_commit(target: Target) -> None:
    # Two Database objects: two API replicas' pools on one database.
    first = await Database.connect(target.settings)
    second = await Database.connect(target.settings)
    try:
        results = await asyncio.gather(
            *(_insert((first, second)[i % 2], f"ns-{i}") for i in range(BURST)),
            return_exceptions=True,
        )
        assert [r for r in results if r is not None] == []
        assert await _count(first) == BURST
    finally:
        await first.close()
        await second.close()


async def test_a_writer_that_waits_too_long_is_refused_as_overload(target: Target) -> None:
    # SQLite: this process's queue; PostgreSQL: the pool, one connection and no overflow.
    update = {"write_wait_s": 0.3, "pool_size": 1, "max_overflow": 0}
    settings = target.settings.model_copy(update=update)
    db = await Database.connect(settings)
    holding, release = asyncio.Event(), asyncio.Event()

    writer = asyncio.create_task(_long_write(db, holding, release))
    try:
        await holding.wait()
        with pytest.raises(OverloadedError) as refused:
            await _insert(db, "impatient")
        assert isinstance(refused.value, QuotaExceededError)  # the API's 429 with Retry-After
        assert refused.value.retry_after_s > 0
        assert "retry" in refused.value.message
    finally:
        release.set()
        await writer
    await _insert(db, "later")  # the queue moves on: nothing is stuck
    async with db.read_session(None) as session:
        names = set((await session.scalars(select(NamespaceRow.id))).all())
    assert names == {"slow", "later"}  # the refused write left nothing behind
    await db.close()


async def test_a_request_that_has_written_finishes_instead_of_being_refused(
    tmp_path: Path,
) -> None:
    # A create writes its record, then starts the sandbox, then records that it runs: refusing
    # that last write as overload would leave a sandbox running behind a 429. Overload is
    # refused at a request's first write only; its later writes wait their turn.
    target = Target("sqlite", {"BKG_DB_PATH": str(tmp_path / "cave.db")})
    db = await Database.connect(target.settings.model_copy(update={"write_wait_s": 0.2}))
    holding, release = asyncio.Event(), asyncio.Event()

    async def request() -> None:  # one task: what one API request runs
        await _insert(db, "first")  # admitted here
        writer = asyncio.create_task(_long_write(db, holding, release))
        await holding.wait()
        asyncio.get_running_loop().call_later(0.6, release.set)  # 3 x write_wait_s
        await _insert(db, "second")  # waits past write_wait_s, and is written
        await writer

    async def newcomer() -> None:  # another request's first write meets the same queue
        await holding.wait()
        await _insert(db, "newcomer")

    try:
        results = await asyncio.gather(request(), newcomer(), return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], OverloadedError)
        async with db.read_session(None) as session:
            names = set((await session.scalars(select(NamespaceRow.id))).all())
        assert names == {"slow", "first", "second"}

        async def admitted_task() -> None:  # work begun before any write (a command run)
            admitted()
            writer = asyncio.create_task(_long_write(db, holding, release))
            await holding.wait()
            asyncio.get_running_loop().call_later(0.6, release.set)
            await _insert(db, "recorded")
            await writer

        holding.clear()
        release.clear()
        await asyncio.create_task(_delete_slow(db))  # a task of its own: this one stays new
        await asyncio.create_task(admitted_task())
        assert await _count(db) == 4
    finally:
        release.set()
        await db.close()


async def _delete_slow(db: Database) -> None:
    async with db.admin_session() as session:
        await session.delete(await session.get(NamespaceRow, "slow"))


async def test_an_admitted_request_waits_for_its_turn_on_both_backends(target: Target) -> None:
    # SQLite: this process's write queue; PostgreSQL: the pool, one connection, no overflow.
    update = {"write_wait_s": 0.2, "pool_size": 1, "max_overflow": 0}
    db = await Database.connect(target.settings.model_copy(update=update))
    holding, release = asyncio.Event(), asyncio.Event()

    async def admitted_request() -> None:  # an exec: its command ran, its record must follow
        admitted()
        await holding.wait()
        await _insert(db, "recorded")

    async def newcomer() -> None:
        await holding.wait()
        await _insert(db, "newcomer")

    writer = asyncio.create_task(_long_write(db, holding, release))
    try:
        await holding.wait()
        asyncio.get_running_loop().call_later(0.6, release.set)  # 3 x the wait
        results = await asyncio.gather(admitted_request(), newcomer(), return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], OverloadedError)
        await writer
        async with db.read_session(None) as session:
            names = set((await session.scalars(select(NamespaceRow.id))).all())
        assert names == {"slow", "recorded"}
    finally:
        release.set()
        await db.close()


async def test_another_process_holding_the_sqlite_file_is_overload_not_an_outage(
    tmp_path: Path,
) -> None:
    target = Target("sqlite", {"BKG_DB_PATH": str(tmp_path / "cave.db")})
    settings = target.settings.model_copy(update={"busy_timeout_s": 0.2})
    db = await Database.connect(settings)
    other = sqlite3.connect(str(settings.path), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another replica's long write
        with pytest.raises(OverloadedError):
            await _insert(db, "blocked")
        other.execute("ROLLBACK")
        await _insert(db, "after")
        assert await _count(db) == 1
    finally:
        other.close()
        await db.close()


def test_an_outage_is_still_an_outage() -> None:
    from sqlalchemy import exc as sa_exc

    from cave.db.errors import translate_error

    unopenable = sa_exc.OperationalError("connect", {}, sqlite3.OperationalError("unable to open"))
    assert isinstance(translate_error(unopenable), DatabaseUnavailableError)
    locked = sa_exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    assert isinstance(translate_error(locked), OverloadedError)
    assert isinstance(translate_error(sa_exc.TimeoutError("QueuePool limit")), OverloadedError)
