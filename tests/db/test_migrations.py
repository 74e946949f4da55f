"""Tests of start-up: migrate, migrate again, migrate from two processes, refuse newer schemas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from cave.db import Base, Database, NamespaceRow, head_revision
from cave.errors import ConfigError
from tests.db.conftest import Target, blocking

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
TABLES = {table.name for table in Base.metadata.sorted_tables}

# Waits for a line on stdin so that both children start migrating at the same moment.
CHILD = """
import asyncio, sys
from cave.db import Database, load_database_settings

async def main() -> None:
    settings = load_database_settings()
    print("ready", flush=True)
    sys.stdin.readline()
    database = await Database.connect(settings)
    await database.close()

asyncio.run(main())
"""


async def _tables(target: Target) -> set[str]:
    if target.backend == "sqlite":
        rows = await target.raw("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = await target.raw("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {name for (name,) in rows}


async def _revisions(target: Target) -> list[str]:
    return [revision for (revision,) in await target.raw("SELECT version_num FROM alembic_version")]


async def test_connect_creates_every_table_at_head(fresh_target: Target) -> None:
    database = await Database.connect(fresh_target.settings)
    await database.close()
    assert await _tables(fresh_target) == TABLES | {"alembic_version"}
    assert await _revisions(fresh_target) == [head_revision()]


async def test_migrating_twice_is_a_no_op(fresh_target: Target) -> None:
    async with (
        await Database.connect(fresh_target.settings) as database,
        database.admin_session() as session,
    ):
        session.add(NamespaceRow(id="ns-a", name="a"))
    async with (
        await Database.connect(fresh_target.settings) as database,
        database.admin_session() as session,
    ):
        names = (await session.execute(select(NamespaceRow.name))).scalars().all()
    assert names == ["a"]
    assert await _revisions(fresh_target) == [head_revision()]


def test_two_processes_migrate_at_once(fresh_target: Target) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BKG_DB_")}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env={**env, **fresh_target.env},
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    results = [child.communicate(timeout=60) for child in children]
    for child, (_, stderr) in zip(children, results, strict=True):
        assert child.returncode == 0, stderr
    assert blocking(_revisions(fresh_target)) == [head_revision()]


async def test_a_newer_schema_is_refused(fresh_target: Target) -> None:
    await (await Database.connect(fresh_target.settings)).close()
    await fresh_target.raw("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(ConfigError) as caught:
        await Database.connect(fresh_target.settings)
    assert str(caught.value) == (
        f"database schema is at revision 9999_future, newer than this CAVE ({head_revision()}); "
        "upgrade CAVE"
    )
    assert await _revisions(fresh_target) == ["9999_future"]  # and nothing was touched


async def test_the_migration_builds_what_the_models_describe(db: Database, target: Target) -> None:
    engine = create_async_engine(target.settings.url())
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(_compare)
    finally:
        await engine.dispose()
    assert differences == []


def _compare(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
