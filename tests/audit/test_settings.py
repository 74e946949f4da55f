"""load_audit_settings: defaults, CAVE_AUDIT_LOG_* values, and the HMAC key's rules."""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path

import pytest
from pydantic import ValidationError

from cave.audit import AuditSettings, load_audit_settings
from cave.audit.settings import key_from_env
from cave.errors import ConfigError

KEY = secrets.token_bytes(32)
UNPADDED = base64.b64encode(KEY).decode().rstrip("=")  # the design's form: no padding


def test_defaults() -> None:
    settings = load_audit_settings({})
    assert settings.enabled is False
    assert settings.path == Path("var/audit/audit.jsonl").absolute()
    assert settings.hmac_key is None
    assert settings.max_bytes == 64 * 1024 * 1024
    assert (settings.fsync, settings.fsync_interval_ms, settings.scrub) == ("batch", 10, False)


def test_every_variable(tmp_path: Path) -> None:
    settings = load_audit_settings(
        {
            "CAVE_AUDIT_LOG_ENABLED": "true",
            "CAVE_AUDIT_LOG_PATH": str(tmp_path / "a.jsonl"),
            "CAVE_AUDIT_LOG_HMAC_KEY": UNPADDED,
            "CAVE_AUDIT_LOG_MAX_BYTES": "1048576",
            "CAVE_AUDIT_LOG_FSYNC": "Always",
            "CAVE_AUDIT_LOG_FSYNC_INTERVAL_MS": "0",
            "BKG_SCRUB_LOGS": "yes",
        }
    )
    assert settings.enabled and settings.scrub and not settings.ephemeral_key
    assert settings.path == tmp_path / "a.jsonl"
    assert settings.key_bytes() == KEY
    assert (settings.max_bytes, settings.fsync, settings.fsync_interval_ms) == (
        1048576,
        "always",
        0,
    )


@pytest.mark.parametrize(
    "encoded",
    [
        UNPADDED,
        base64.b64encode(KEY).decode(),  # padded is accepted too
        base64.urlsafe_b64encode(KEY).decode().rstrip("="),
        f"  {UNPADDED}\n",
    ],
)
def test_key_forms(encoded: str) -> None:
    settings = load_audit_settings({"CAVE_AUDIT_LOG_HMAC_KEY": encoded})
    assert settings.key_bytes() == KEY


@pytest.mark.parametrize(
    ("encoded", "why"),
    [
        ("not base64!", "not valid base64"),
        ("abcde", "not valid base64"),  # a length no base64 text has
        (base64.b64encode(b"short key").decode().rstrip("="), "decodes to 9 bytes; at least 16"),
    ],
)
def test_malformed_key_names_the_variable(encoded: str, why: str) -> None:
    for enabled in ("true", "false"):  # a bad key stops start-up even with the log off
        env = {"CAVE_AUDIT_LOG_HMAC_KEY": encoded, "CAVE_AUDIT_LOG_ENABLED": enabled}
        with pytest.raises(ConfigError, match=f"^CAVE_AUDIT_LOG_HMAC_KEY .*{why}") as caught:
            load_audit_settings(env)
        assert encoded.strip() not in str(caught.value)  # a secret is never echoed


def test_production_requires_a_key() -> None:
    env = {"CAVE_AUDIT_LOG_ENABLED": "true", "CAVE_ENV": "production"}
    with pytest.raises(ConfigError, match="CAVE_AUDIT_LOG_HMAC_KEY is required"):
        load_audit_settings(env)
    assert load_audit_settings({"CAVE_ENV": "production"}).hmac_key is None  # log off: no key


def test_development_makes_up_a_key_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cave.audit"):
        first = load_audit_settings({"CAVE_AUDIT_LOG_ENABLED": "true"})
        second = load_audit_settings({"CAVE_AUDIT_LOG_ENABLED": "true"})
    assert first.ephemeral_key and len(first.key_bytes()) == 32
    assert first.key_bytes() != second.key_bytes()
    assert "CAVE_AUDIT_LOG_HMAC_KEY is not set" in caplog.text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CAVE_AUDIT_LOG_ENABLED", "maybe"),
        ("CAVE_AUDIT_LOG_FSYNC", "sometimes"),
        ("CAVE_AUDIT_LOG_MAX_BYTES", "0"),
        ("CAVE_AUDIT_LOG_MAX_BYTES", "64MiB"),
        ("CAVE_AUDIT_LOG_FSYNC_INTERVAL_MS", "-1"),
        ("CAVE_AUDIT_LOG_PATH", ""),
        ("BKG_SCRUB_LOGS", "on"),
    ],
)
def test_bad_values_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}={value!r}: expected"):
        load_audit_settings({variable: value})


def test_the_key_stays_out_of_repr() -> None:
    settings = load_audit_settings({"CAVE_AUDIT_LOG_HMAC_KEY": UNPADDED})
    assert KEY.hex() not in repr(settings) and str(KEY) not in repr(settings)
    assert "**********" in repr(settings)


def test_a_short_key_is_refused_by_the_model_too() -> None:
    with pytest.raises(ValidationError, match="at least 16 bytes"):
        AuditSettings(hmac_key=b"short")


def test_key_from_env() -> None:
    assert key_from_env({"CAVE_AUDIT_LOG_HMAC_KEY": UNPADDED}) == KEY
    with pytest.raises(ConfigError, match="CAVE_AUDIT_LOG_HMAC_KEY is not set"):
        key_from_env({})


def test_the_key_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text(UNPADDED + "\n")
    env = {"CAVE_AUDIT_LOG_HMAC_KEY_FILE": str(tmp_path / "hmac"), "CAVE_ENV": "production"}
    settings = load_audit_settings({**env, "CAVE_AUDIT_LOG_ENABLED": "true"})
    assert settings.key_bytes() == KEY and key_from_env(env) == KEY
    with pytest.raises(ConfigError, match="CAVE_AUDIT_LOG_HMAC_KEY_FILE=.*cannot read it"):
        load_audit_settings({"CAVE_AUDIT_LOG_HMAC_KEY_FILE": str(tmp_path / "gone")})
