"""The database fixtures of tests/db (SQLite and PostgreSQL for every test) serve auth tests too."""

from __future__ import annotations

import secrets

import pytest

from cave.auth.settings import AuthSettings
from tests.db.conftest import anyio_backend, backend, db, pg_database, target  # noqa: F401


@pytest.fixture
def auth_settings() -> AuthSettings:
    return AuthSettings(
        production=False,
        key_pepper=secrets.token_bytes(32),
        secret_key=secrets.token_bytes(32),
        webhook_secret=b"hook-secret",
        webhook_url=None,
        rotation_grace_s=3600,
    )
