"""Audit log settings (`AuditSettings`), read from CAVE_AUDIT_LOG_* and BKG_SCRUB_LOGS."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, SecretBytes, field_validator

from cave.env import env_secret
from cave.errors import ConfigError
from cave.settings_env import env_field, is_production, read_env, validate

log = logging.getLogger("cave.audit")

KEY_VARIABLE = "CAVE_AUDIT_LOG_HMAC_KEY"
MIN_KEY_BYTES = 16
DEFAULT_PATH = Path("var/audit/audit.jsonl")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

FsyncPolicy = Literal["batch", "always", "never"]


class AuditSettings(BaseModel, frozen=True, extra="forbid"):
    """Where and how the JSONL audit log is written; built once by `load_audit_settings`."""

    enabled: bool = env_field(
        "CAVE_AUDIT_LOG_ENABLED",
        False,
        description="Write the signed JSONL audit log (see audit.md)",
    )
    path: Path = env_field(
        "CAVE_AUDIT_LOG_PATH",
        DEFAULT_PATH,
        description=(
            "The live file (each API replica writes its own `<stem>.<replica>.jsonl` beside "
            "it); made absolute against the working directory at load time"
        ),
    )
    hmac_key: SecretBytes | None = env_field(
        KEY_VARIABLE,
        None,
        secret_file=True,
        text=True,
        accepts=f"base64 (padding optional), at least {MIN_KEY_BYTES} bytes",
        shown_default="unset (development: a key of the process, unverifiable later)",
        description=(
            "The HMAC key of the log's chain, base64 without padding (32 bytes recommended); "
            "a malformed key stops start-up even with the log off; verifying the log needs it"
        ),
    )
    ephemeral_key: bool = False  # hmac_key was made up for this process: unverifiable later
    max_bytes: int = env_field(
        "CAVE_AUDIT_LOG_MAX_BYTES",
        DEFAULT_MAX_BYTES,
        gt=0,
        description="Rotate the live file once it reaches this size (bytes)",
    )
    fsync: FsyncPolicy = env_field(
        "CAVE_AUDIT_LOG_FSYNC",
        "batch",
        description=(
            "`batch`: group commit; `always`: one write and fsync per line; `never`: no fsync "
            "(lines reach the OS every interval)"
        ),
    )
    fsync_interval_ms: int = env_field(
        "CAVE_AUDIT_LOG_FSYNC_INTERVAL_MS",
        10,
        ge=0,
        description=(
            "Under `batch`, the longest the flusher lingers for more lines before an fsync; "
            "under `never`, how often lines are written to the OS; 0: no lingering"
        ),
    )
    scrub: bool = env_field(
        "BKG_SCRUB_LOGS",
        False,
        description=(
            "Mask personal data and secrets in audit `details` and `target` (and in log "
            "records, through `ScrubFilter`)"
        ),
    )

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


def load_audit_settings(env: Mapping[str, str] | None = None) -> AuditSettings:
    """Read the audit settings from `env` (default os.environ); a bad value is a ConfigError."""
    env = os.environ if env is None else env
    values, sources = read_env(AuditSettings, env)  # the key's text: decoded here, never shown
    key = values.pop("hmac_key", None)
    values.update(_key_fields(env, key, bool(values.get("enabled", False))))
    # Ray workers do not share the driver's working directory.
    values["path"] = Path(values.get("path", DEFAULT_PATH)).absolute()
    return validate(AuditSettings, values, sources)


def _key_fields(env: Mapping[str, str], raw: str | None, enabled: bool) -> dict[str, object]:
    if raw is not None:  # from CAVE_AUDIT_LOG_HMAC_KEY or CAVE_AUDIT_LOG_HMAC_KEY_FILE
        return {"hmac_key": decode_hmac_key(raw)}  # checked even when the log is disabled
    if not enabled:
        return {}
    if is_production(env):
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
