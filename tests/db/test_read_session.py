"""Read-only sessions: they see what scoped sessions see, and on SQLite never wait for a writer."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from cave.db import Database, NamespaceRow, SandboxRow

pytestmark = pytest.mark.anyio


async def test_a_read_session_sees_only_its_namespace(two_namespaces: Database) -> None:
    db = two_namespaces
    async with db.read_session("ns-a") as session:
        names = set((await session.scalars(select(SandboxRow.name))).all())
    assert names == {"ns-a-1", "ns-a-2"}
    async with db.read_session(None) as session:
        every = set((await session.scalars(select(SandboxRow.name))).all())
    assert {"ns-a-1", "ns-b-1"} <= every


async def test_a_read_does_not_wait_for_an_open_write(db: Database) -> None:
    writing, release = asyncio.Event(), asyncio.Event()

    async def long_write() -> None:
        async with db.admin_session() as session:
            session.add(NamespaceRow(id="slow-writer", name="slow-writer"))
            await session.flush()  # the write lock is held from here until commit
            writing.set()
            await release.wait()

    writer = asyncio.create_task(long_write())
    await writing.wait()
    try:
        async with asyncio.timeout(5):  # a read queued behind the writer would wait forever
            async with db.read_session(None) as session:
                seen = await session.get(NamespaceRow, "slow-writer")
        assert seen is None  # the uncommitted row is invisible
    finally:
        release.set()
        await writer
