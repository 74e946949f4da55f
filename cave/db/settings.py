"""Database settings: BKG_DB_DSN(_FILE) selects PostgreSQL (asyncpg), else BKG_DB_PATH SQLite."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from cave.errors import ConfigError
from cave.settings_env import env_field, is_production, read_env

DEFAULT_SQLITE_PATH = Path("var") / "cave.db"

_ASYNC_POSTGRES = "postgresql+asyncpg"
# Schemes a user may write; all of them mean PostgreSQL through asyncpg.
_POSTGRES_SCHEMES = {"postgresql", "postgres", _ASYNC_POSTGRES}
_DSN_EXAMPLE = "postgresql+asyncpg://user:password@host:5432/database"

log = logging.getLogger(__name__)


class DatabaseSettings(BaseModel, frozen=True, extra="forbid"):
    """Where the database is and how long to wait for it; exactly one of `dsn` and `path` is set."""

    dsn: SecretStr | None = env_field(
        "BKG_DB_DSN",
        None,
        secret_file=True,
        accepts=f"a PostgreSQL URL (`{_DSN_EXAMPLE}`)",
        shown_default="unset",
        description=(
            "PostgreSQL through asyncpg (`postgresql://` and `postgres://` mean the same); wins "
            "over `BKG_DB_PATH` (with a warning); see database.md"
        ),
    )
    path: Path | None = env_field(
        "BKG_DB_PATH",
        None,
        blank_is_unset=True,
        shown_default="`./var/cave.db` (refused in production)",
        description=(
            "SQLite database file, when `BKG_DB_DSN` is unset; relative to the working "
            "directory (`cave up` makes it absolute)"
        ),
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)
    busy_timeout_s: float = Field(default=5.0, gt=0)
    pool_size: int = Field(default=5, gt=0)
    max_overflow: int = Field(default=10, ge=0)  # PostgreSQL: connections beyond pool_size
    # How long a write waits for its turn (SQLite: this process's queue for the file's write
    # lock; PostgreSQL: a pooled connection) before the request is refused as overload (429).
    write_wait_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_backend(self) -> Self:
        if (self.dsn is None) == (self.path is None):
            raise ValueError("exactly one of dsn and path must be set")
        if self.path is not None and not self.path.is_absolute():
            # Ray workers do not share the driver's working directory.
            raise ValueError("path must be absolute")
        return self

    @property
    def backend(self) -> Literal["postgresql", "sqlite"]:
        return "sqlite" if self.dsn is None else "postgresql"

    def url(self) -> URL:
        """The SQLAlchemy URL with its async driver (contains the password: never log it)."""
        if self.dsn is not None:
            return make_url(self.dsn.get_secret_value())
        return URL.create("sqlite+aiosqlite", database=str(self.path))

    def describe(self) -> str:
        """Where the database is, for messages: host, port and database, never the password."""
        if self.path is not None:
            return f"SQLite at {self.path}"
        url = self.url()
        return f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def load_database_settings(
    env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> DatabaseSettings:
    """Read BKG_DB_DSN / BKG_DB_PATH from `env` (default os.environ); relative paths use `cwd`."""
    env = os.environ if env is None else env
    values, _ = read_env(DatabaseSettings, env)  # BKG_DB_DSN may be BKG_DB_DSN_FILE: a password
    dsn, path = str(values.get("dsn") or "").strip(), values.get("path")
    if not dsn and not path and is_production(env):
        # A mistyped BKG_DB_DSN_FILE must not turn into a fresh SQLite file in a worker's cwd.
        raise ConfigError(
            "BKG_DB_DSN (or BKG_DB_DSN_FILE) is required when CAVE_ENV=production; "
            "set BKG_DB_PATH to run on SQLite on purpose"
        )
    if dsn:
        if path:
            log.warning(
                "BKG_DB_DSN and BKG_DB_PATH are both set: using BKG_DB_DSN, ignoring BKG_DB_PATH"
            )
        return DatabaseSettings(dsn=SecretStr(_async_dsn(dsn)))
    base = Path.cwd() if cwd is None else cwd
    return DatabaseSettings(path=base / (path or DEFAULT_SQLITE_PATH))


def _async_dsn(dsn: str) -> str:
    try:
        url = make_url(dsn)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"BKG_DB_DSN={_masked(dsn)!r}: not a database URL (expected {_DSN_EXAMPLE})"
        ) from None
    if url.drivername not in _POSTGRES_SCHEMES:
        raise ConfigError(
            f"BKG_DB_DSN: unsupported scheme {url.drivername!r} "
            f"(expected postgresql:// or postgresql+asyncpg://); for SQLite set BKG_DB_PATH"
        )
    if not url.database:
        raise ConfigError(
            f"BKG_DB_DSN={_masked(dsn)!r}: names no database (expected {_DSN_EXAMPLE})"
        )
    return url.set(drivername=_ASYNC_POSTGRES).render_as_string(hide_password=False)


def _masked(dsn: str) -> str:
    # The DSN may hold a password; show the rest so the operator can spot the typo.
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
