"""Tests of cave.db.settings: which backend BKG_DB_DSN / BKG_DB_PATH select, and their errors."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from cave.db import DatabaseSettings, load_database_settings
from cave.errors import ConfigError


def test_sqlite_under_the_working_directory_by_default(tmp_path: Path) -> None:
    settings = load_database_settings({}, cwd=tmp_path)
    assert settings.backend == "sqlite"
    assert settings.path == tmp_path / "var" / "cave.db"
    assert str(settings.url()) == f"sqlite+aiosqlite:///{tmp_path}/var/cave.db"
    assert not (tmp_path / "var").exists()  # made by Database.connect, not by reading settings


def test_relative_path_is_resolved_against_the_working_directory(tmp_path: Path) -> None:
    settings = load_database_settings({"BKG_DB_PATH": "data/x.db"}, cwd=tmp_path)
    assert settings.path == tmp_path / "data" / "x.db"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://cave:s3cret@db.example:5433/cave",
        "postgres://cave:s3cret@db.example:5433/cave",
        "postgresql+asyncpg://cave:s3cret@db.example:5433/cave",
    ],
)
def test_dsn_selects_postgresql_through_asyncpg(dsn: str) -> None:
    settings = load_database_settings({"BKG_DB_DSN": dsn})
    assert settings.backend == "postgresql"
    url = settings.url()
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+asyncpg",
        "db.example",
        5433,
        "cave",
    )
    assert url.password == "s3cret"
    assert settings.describe() == "PostgreSQL at db.example:5433/cave"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)


def test_dsn_wins_over_path_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    env = {"BKG_DB_DSN": "postgresql://cave@db/cave", "BKG_DB_PATH": "/tmp/cave.db"}
    with caplog.at_level(logging.WARNING, logger="cave.db"):
        settings = load_database_settings(env)
    assert settings.backend == "postgresql" and settings.path is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "BKG_DB_DSN" in caplog.text and "ignoring BKG_DB_PATH" in caplog.text


def test_empty_dsn_counts_as_unset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_database_settings({"BKG_DB_DSN": " ", "BKG_DB_PATH": "c.db"}, cwd=tmp_path)
    assert settings.path == tmp_path / "c.db"
    assert not caplog.records


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("not a url", "not a database URL"),
        ("postgresql://cave:s3cret@db:port/cave", "not a database URL"),
        ("mysql://cave:s3cret@db/cave", "unsupported scheme 'mysql'"),
        ("sqlite:///var/cave.db", "unsupported scheme 'sqlite'"),
        ("postgresql://cave:s3cret@db", "names no database"),
    ],
)
def test_malformed_dsn_is_a_config_error_naming_the_variable(dsn: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_database_settings({"BKG_DB_DSN": dsn})
    message = str(caught.value)
    assert message.startswith("BKG_DB_DSN")
    assert problem in message
    assert "s3cret" not in message


def test_settings_pickle_for_ray_workers() -> None:
    settings = load_database_settings({"BKG_DB_DSN": "postgresql://cave:pw@db/cave"})
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_exactly_one_backend() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DatabaseSettings()
    with pytest.raises(ValueError, match="absolute"):
        DatabaseSettings(path=Path("relative.db"))


def test_the_dsn_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("postgresql://cave:s3cret@db.internal:5432/cave\n")
    settings = load_database_settings({"BKG_DB_DSN_FILE": str(tmp_path / "dsn")})
    assert settings.url().password == "s3cret" and settings.backend == "postgresql"
    with pytest.raises(ConfigError, match="BKG_DB_DSN and BKG_DB_DSN_FILE are both set"):
        load_database_settings({"BKG_DB_DSN": "postgresql://x@h/d", "BKG_DB_DSN_FILE": "/x"})


def test_production_refuses_to_make_up_a_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BKG_DB_DSN .* is required when CAVE_ENV=production"):
        load_database_settings({"CAVE_ENV": "production"}, cwd=tmp_path)
    chosen = {"CAVE_ENV": "production", "BKG_DB_PATH": str(tmp_path / "cave.db")}
    assert load_database_settings(chosen).backend == "sqlite"  # SQLite on purpose is allowed
