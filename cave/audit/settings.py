"""Audit log settings (`AuditSettings`), read from CAVE_AUDIT_LOG_* and BKG_SCRUB_LOGS."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, SecretBytes, ValidationError, field_validator

from cave.env import env_secret, parse_bool, parse_choice
from cave.errors import ConfigError

log = logging.getLogger("cave.audit")

KEY_VARIABLE = "CAVE_AUDIT_LOG_HMAC_KEY"
MIN_KEY_BYTES = 16
DEFAULT_PATH = Path("var/audit/audit.jsonl")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

FsyncPolicy = Literal["batch", "always", "never"]


class AuditSettings(BaseModel, frozen=True, extra="forbid"):
    """Where and how the JSONL audit log is written; built once by `load_audit_settings`."""

    enabled: bool = False
    path: Path = DEFAULT_PATH
    hmac_key: SecretBytes | None = None
    ephemeral_key: bool = False  # hmac_key was made up for this process: unverifiable later
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    fsync: FsyncPolicy = "batch"
    fsync_interval_ms: int = Field(default=10, ge=0)
    scrub: bool = False

    @field_validator("hmac_key")
    @classmethod
    def _long_enough(cls, value: SecretBytes | None) -> SecretBytes | None:
        if value is not None and len(value.get_secret_value()) < MIN_KEY_BYTES:
            raise ValueError(f"the HMAC key must be at least {MIN_KEY_BYTES} bytes")
        return value

    def key_bytes(self) -> bytes:
        """The HMAC key; a ConfigError when there is none."""
        if self.hmac_key is None:
            raise ConfigError(f"{KEY_VARIABLE} is not set: the audit log needs an HMAC key")
        return self.hmac_key.get_secret_value()


def decode_hmac_key(raw: str) -> bytes:
    """The key in `raw`: base64 (padding optional, standard or URL-safe alphabet), >= 16 bytes."""
    text = raw.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        # Never echo the value: it is a secret, even when malformed.
        raise ConfigError(
            f"{KEY_VARIABLE} is not valid base64 (expected base64 without padding, "
            "e.g. from `head -c 32 /dev/urandom | base64 | tr -d =`)"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{KEY_VARIABLE} decodes to {len(key)} bytes; at least {MIN_KEY_BYTES} are needed"
        )
    return key


def key_from_env(env: Mapping[str, str] | None = None) -> bytes:
    """The key from CAVE_AUDIT_LOG_HMAC_KEY (for verifying); a ConfigError when absent or bad."""
    raw = env_secret(os.environ if env is None else env, KEY_VARIABLE)
    if raw is None:
        raise ConfigError(f"{KEY_VARIABLE} is not set: it is needed to verify the audit log")
    return decode_hmac_key(raw)


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value

    return parse


def _policy(raw: str) -> str:
    return parse_choice(raw, get_args(FsyncPolicy))


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("expected a file path")
    return Path(raw)


# variable -> (field, parser); the key is read apart because it is a secret.
ENV_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "CAVE_AUDIT_LOG_ENABLED": ("enabled", parse_bool),
    "CAVE_AUDIT_LOG_PATH": ("path", _path),
    "CAVE_AUDIT_LOG_MAX_BYTES": ("max_bytes", _integer(1)),
    "CAVE_AUDIT_LOG_FSYNC": ("fsync", _policy),
    "CAVE_AUDIT_LOG_FSYNC_INTERVAL_MS": ("fsync_interval_ms", _integer(0)),
    "BKG_SCRUB_LOGS": ("scrub", parse_bool),
}


def load_audit_settings(env: Mapping[str, str] | None = None) -> AuditSettings:
    """Read the audit settings from `env` (default os.environ); a bad value is a ConfigError."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for variable, (field, parse) in ENV_VARIABLES.items():
        if variable in env:
            try:
                values[field] = parse(env[variable])
            except ValueError as exc:
                raise ConfigError(f"{variable}={env[variable]!r}: {exc}") from None
    values.update(_key_fields(env, bool(values.get("enabled", False))))
    # Ray workers do not share the driver's working directory.
    values["path"] = Path(str(values.get("path", DEFAULT_PATH))).absolute()
    try:
        return AuditSettings.model_validate(values)
    except ValidationError as exc:  # the parsers above already refuse what the model would
        raise ConfigError(f"audit settings: {exc}") from None


def _key_fields(env: Mapping[str, str], enabled: bool) -> dict[str, object]:
    raw = env_secret(env, KEY_VARIABLE)  # or CAVE_AUDIT_LOG_HMAC_KEY_FILE
    if raw is not None:
        return {"hmac_key": decode_hmac_key(raw)}  # checked even when the log is disabled
    if not enabled:
        return {}
    if env.get("CAVE_ENV", "development").strip().lower() == "production":
        raise ConfigError(
            f"{KEY_VARIABLE} is required when CAVE_AUDIT_LOG_ENABLED=true and "
            f"CAVE_ENV=production (or {KEY_VARIABLE}_FILE naming a file that holds it)"
        )
    log.warning(
        "%s is not set: signing the audit log with a random key of this process only "
        "(development); nobody can verify this log later",
        KEY_VARIABLE,
    )
    return {"hmac_key": secrets.token_bytes(32), "ephemeral_key": True}
