"""SQLite specifics: the engine's pragmas and transaction start, and the start-up file lock."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cave.db.settings import DatabaseSettings
from cave.errors import ConfigError, DatabaseUnavailableError

# How long a process waits for another one to finish creating or migrating the file.
STARTUP_WAIT_S = 60.0
_POLL_S = 0.05
READ_ONLY_OPTION = "cave_read_only"  # an execution option: begin DEFERRED, not IMMEDIATE


def create_sqlite_engine(settings: DatabaseSettings) -> AsyncEngine:
    """An aiosqlite engine with WAL, foreign keys, a busy timeout and BEGIN IMMEDIATE."""
    assert settings.path is not None
    try:
        settings.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"BKG_DB_PATH={str(settings.path)!r}: cannot create its directory: {error.strerror}"
        ) from None
    engine = create_async_engine(settings.url(), connect_args={"timeout": settings.busy_timeout_s})
    busy_ms = int(settings.busy_timeout_s * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode")
        # WAL is a property of the file: switch once (that needs an exclusive lock), then keep.
        if cursor.fetchone()[0] != "wal":
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front: a read-then-write transaction cannot fail
        # half-way with SQLITE_BUSY, writers queue on busy_timeout instead. A read-only
        # transaction begins DEFERRED: in WAL mode it reads a snapshot without any lock.
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


@asynccontextmanager
async def startup_lock(path: Path, wait_s: float = STARTUP_WAIT_S) -> AsyncIterator[None]:
    """Held by one process at a time while it creates, switches to WAL and migrates the file."""
    # A separate file: closing any descriptor of the database itself would drop SQLite's locks.
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise DatabaseUnavailableError(
            f"cannot connect to SQLite at {path}: cannot open {lock_path}: {error.strerror}"
        ) from None
    try:
        await _acquire(fd, lock_path, wait_s)
        yield
    finally:
        os.close(fd)  # releases the lock


async def _acquire(fd: int, lock_path: Path, wait_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if loop.time() >= deadline:
                raise DatabaseUnavailableError(
                    f"{lock_path} still held by another process after {wait_s:g}s"
                ) from None
            await asyncio.sleep(_POLL_S)
