"""Database fixtures: every test body runs on a SQLite file and on a PostgreSQL database.

PostgreSQL: the session creates its own database `cave_test_<random>` through a maintenance
connection to `test` (override with CAVE_TEST_PG_DSN) and drops it at the end; tests that need an
empty database get a scratch one named after it, dropped after the test.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from cave.db import (
    ApiKeyRow,
    Database,
    DatabaseSettings,
    NamespaceRow,
    SandboxRow,
    load_database_settings,
)

MAINTENANCE_DSN = os.environ.get("CAVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = (
    "usage_events, model_access_tokens, model_access_requests, audit_events, outbox, "
    "key_rotation_events, api_keys, executions, sandboxes, namespaces, signing_keys, "
    "registered_models, webhook_ids"
)

_T = TypeVar("_T")


def blocking(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to the end on its own loop in another thread (safe inside a test loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _dsn(database: str) -> str:
    return MAINTENANCE_DSN.rsplit("/", 1)[0] + "/" + database


async def pg_execute(sql: str, *args: Any, database: str | None = None) -> list[tuple[Any, ...]]:
    dsn = MAINTENANCE_DSN if database is None else _dsn(database)
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        return [tuple(record) for record in await connection.fetch(sql, *args)]
    finally:
        await connection.close()


@dataclass
class Target:
    """One database a test may use, and a back door to it that bypasses CAVE (and RLS)."""

    backend: str
    env: dict[str, str]  # the BKG_* variables that select it
    database: str | None = None  # PostgreSQL only
    path: Path | None = None  # SQLite only

    @property
    def settings(self) -> DatabaseSettings:
        return load_database_settings(self.env)

    async def raw(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run SQL as the owner (PostgreSQL: the superuser, so row-level security is bypassed)."""
        if self.path is None:
            return await pg_execute(sql, *args, database=self.database)
        connection = sqlite3.connect(self.path)
        try:
            with connection:  # commits
                return connection.execute(sql.replace("$1", "?"), args).fetchall()
        finally:
            connection.close()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    name = f"cave_test_{uuid.uuid4().hex[:12]}"
    try:
        blocking(pg_execute(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(f"PostgreSQL not usable at {MAINTENANCE_DSN}: {error}")
    yield name
    for (leftover,) in blocking(
        pg_execute("SELECT datname FROM pg_database WHERE datname LIKE $1", f"{name}%")
    ):
        blocking(pg_execute(f'DROP DATABASE "{leftover}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_scratch = itertools.count()


@pytest.fixture
def target(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """The session's database, emptied (PostgreSQL), or a new SQLite file."""
    if backend == "sqlite":
        return _sqlite_target(tmp_path / "cave.db")
    database = request.getfixturevalue("pg_database")
    tables = blocking(pg_execute("SELECT to_regclass('namespaces') IS NOT NULL", database=database))
    if tables[0][0]:
        blocking(pg_execute(f"TRUNCATE {TABLES}", database=database))
    return Target("postgresql", {"BKG_DB_DSN": _dsn(database)}, database=database)


@pytest.fixture
def fresh_target(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A database never migrated: a SQLite file in a directory not yet made, or a scratch one."""
    if backend == "sqlite":
        yield _sqlite_target(tmp_path / "not" / "yet" / "cave.db")
        return
    database = f"{request.getfixturevalue('pg_database')}_{next(_scratch)}"
    blocking(pg_execute(f'CREATE DATABASE "{database}"'))
    yield Target("postgresql", {"BKG_DB_DSN": _dsn(database)}, database=database)
    blocking(pg_execute(f'DROP DATABASE "{database}" WITH (FORCE)'))


def _sqlite_target(path: Path) -> Target:
    return Target("sqlite", {"BKG_DB_PATH": str(path)}, path=path)


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    database = await Database.connect(target.settings)
    yield database
    await database.close()


@pytest.fixture
async def two_namespaces(db: Database) -> AsyncIterator[Database]:
    """ns-a and ns-b with two sandboxes each, and one admin key (no namespace)."""
    async with db.admin_session() as session:
        session.add_all([NamespaceRow(id="ns-a", name="a"), NamespaceRow(id="ns-b", name="b")])
        await session.flush()
        session.add_all(
            SandboxRow(id=f"{ns}-{i}", namespace_id=ns, name=f"{ns}-{i}", state="running")
            for ns in ("ns-a", "ns-b")
            for i in (1, 2)
        )
        session.add(ApiKeyRow(kind="admin", prefix="cave_admin_1", secret_hash="h"))
    yield db
