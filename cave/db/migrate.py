"""Alembic driven from code: upgrade to head under a lock, and refuse a schema newer than ours."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from cave.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key shared by every CAVE process migrating the same database ("CAVE", 1).
_LOCK_KEY = (0x43415645 << 32) | 1


def alembic_config() -> Config:
    """An Alembic Config for CAVE's scripts, without alembic.ini (for `command.revision` too)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this CAVE knows."""
    head = _scripts().get_current_head()
    assert head is not None, "no migration scripts"
    return head


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the database to head; concurrent callers wait for each other, the later ones no-op."""
    # One transaction holds the lock, the upgrade and the version stamp: all or nothing.
    # SQLite: the engine begins with BEGIN IMMEDIATE, which already excludes other writers.
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        await connection.run_sync(_upgrade_locked)


def current_revisions(connection: Connection) -> tuple[str, ...]:
    """The revisions stamped in the database (empty before the first migration)."""
    return tuple(MigrationContext.configure(connection).get_current_heads())


def _upgrade_locked(connection: Connection) -> None:
    current = current_revisions(connection)
    known = {script.revision for script in _scripts().walk_revisions()}
    for revision in current:
        if revision not in known:
            raise ConfigError(
                f"database schema is at revision {revision}, newer than this CAVE "
                f"({head_revision()}); upgrade CAVE"
            )
    if set(current) == set(_scripts().get_heads()):
        return
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
