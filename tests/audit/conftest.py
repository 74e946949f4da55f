"""Fixtures of the audit tests: a random key and a log path in a scratch directory."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"
