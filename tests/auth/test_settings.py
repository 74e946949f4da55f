"""Auth settings: production refuses missing secrets; development keeps generated ones."""

from __future__ import annotations

import base64
import secrets
import stat
from pathlib import Path

import pytest

from cave.auth.settings import load_auth_settings
from cave.errors import ConfigError


def _b64(data: bytes, padded: bool = False) -> str:
    text = base64.b64encode(data).decode()
    return text if padded else text.rstrip("=")


def test_production_requires_every_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CAVE_KEY_PEPPER is required"):
        load_auth_settings({"CAVE_ENV": "production"}, tmp_path)
    with pytest.raises(ConfigError, match="CAVE_SECRET_KEY is required"):
        load_auth_settings(
            {"CAVE_ENV": "production", "CAVE_KEY_PEPPER": _b64(secrets.token_bytes(32))}, tmp_path
        )
    assert not list(tmp_path.iterdir())  # nothing made up in production


def test_given_secrets_are_decoded_with_or_without_padding(tmp_path: Path) -> None:
    pepper, key = secrets.token_bytes(40), secrets.token_bytes(32)
    settings = load_auth_settings(
        {
            "CAVE_ENV": "production",
            "CAVE_KEY_PEPPER": _b64(pepper),
            "CAVE_SECRET_KEY": _b64(key, padded=True),
        },
        tmp_path,
    )
    assert (settings.key_pepper, settings.secret_key) == (pepper, key)
    assert settings.production


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAVE_KEY_PEPPER": "!!!"}, "CAVE_KEY_PEPPER is not valid base64"),
        ({"CAVE_KEY_PEPPER": _b64(b"short")}, "CAVE_KEY_PEPPER must decode to at least 32"),
        ({"CAVE_SECRET_KEY": _b64(secrets.token_bytes(33))}, "CAVE_SECRET_KEY must decode to"),
        ({"CAVE_KEY_ROTATION_GRACE_S": "-1"}, "CAVE_KEY_ROTATION_GRACE_S"),
        ({"CAVE_KEY_ROTATION_GRACE_S": "soon"}, "CAVE_KEY_ROTATION_GRACE_S"),
    ],
)
def test_malformed_values_name_the_variable(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_auth_settings(env, tmp_path)


def test_development_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    first = load_auth_settings({}, tmp_path)
    second = load_auth_settings({}, tmp_path)
    assert first.key_pepper == second.key_pepper and first.secret_key == second.secret_key
    assert len(first.secret_key) == 32
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
