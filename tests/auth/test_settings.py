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


def _files(tmp_path: Path, **secrets_by_name: str) -> dict[str, str]:
    """Each secret written to a file of its own (0400, as the deploy files mount them), and the
    NAME_FILE variables that point at them."""
    env = {}
    for name, value in secrets_by_name.items():
        path = tmp_path / "mounted" / name.lower()
        path.parent.mkdir(exist_ok=True)
        path.write_text(value + "\n")
        path.chmod(0o400)
        env[f"{name}_FILE"] = str(path)
    return env


def test_production_reads_every_secret_from_files(tmp_path: Path) -> None:
    pepper, key = secrets.token_bytes(32), secrets.token_bytes(32)
    env = _files(
        tmp_path,
        CAVE_KEY_PEPPER=_b64(pepper),
        CAVE_SECRET_KEY=_b64(key),
        CAVE_ROTATION_WEBHOOK_SECRET="whsec-test",
    )
    settings = load_auth_settings({"CAVE_ENV": "production", **env}, tmp_path / "dev")
    assert (settings.key_pepper, settings.secret_key) == (pepper, key)
    assert settings.webhook_secret == b"whsec-test"
    assert not (tmp_path / "dev").exists()  # nothing made up


def test_a_secret_in_the_environment_and_in_a_file_is_refused(tmp_path: Path) -> None:
    pepper = _b64(secrets.token_bytes(32))
    env = {"CAVE_KEY_PEPPER": pepper, **_files(tmp_path, CAVE_KEY_PEPPER=pepper)}
    with pytest.raises(ConfigError, match="CAVE_KEY_PEPPER and CAVE_KEY_PEPPER_FILE are both set"):
        load_auth_settings(env, tmp_path)


def test_an_unreadable_secret_file_stops_start_up_even_outside_production(tmp_path: Path) -> None:
    env = {"CAVE_SECRET_KEY_FILE": str(tmp_path / "not-mounted")}
    with pytest.raises(ConfigError, match="CAVE_SECRET_KEY_FILE=.*not-mounted.*cannot read it"):
        load_auth_settings(env, tmp_path / "dev")
    assert not (tmp_path / "dev" / "cave_secret_key").exists()  # no made-up key in its place


def test_production_refuses_a_webhook_url_without_its_secret(tmp_path: Path) -> None:
    env = {
        "CAVE_ENV": "production",
        "CAVE_KEY_PEPPER": _b64(secrets.token_bytes(32)),
        "CAVE_SECRET_KEY": _b64(secrets.token_bytes(32)),
        "CAVE_ROTATION_WEBHOOK_URL": "https://hooks.example/rotated",
    }
    with pytest.raises(ConfigError, match="CAVE_ROTATION_WEBHOOK_URL is set but"):
        load_auth_settings(env, tmp_path)
    # Development keeps working without webhooks; production without a URL needs no secret.
    assert load_auth_settings({**env, "CAVE_ENV": "development"}, tmp_path).webhook_url
    del env["CAVE_ROTATION_WEBHOOK_URL"]
    assert load_auth_settings(env, tmp_path).webhook_secret is None
