"""Secrets of the access-control layer, from CAVE_* variables; production refuses made-up ones."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cave.errors import ConfigError
from cave.settings_env import env_field, is_production, read_env, validate

log = logging.getLogger("cave.auth")
DEFAULT_SECRETS_DIR = Path("var/secrets")
_MADE_UP = "unset (development: generated in `CAVE_SECRETS_DIR`)"


class AuthSettings(BaseModel, frozen=True, extra="forbid"):
    """Secrets and rotation of API keys; production refuses made-up secrets."""

    production: bool = False  # CAVE_ENV=production (cave.settings_env.CaveEnvironment)
    key_pepper: bytes = env_field(
        "CAVE_KEY_PEPPER",
        secret_file=True,
        text=True,
        repr=False,
        accepts="base64, at least 32 bytes",
        shown_default=_MADE_UP,
        description="Keys the hash of every API key secret",
    )
    secret_key: bytes = env_field(
        "CAVE_SECRET_KEY",
        secret_file=True,
        text=True,
        repr=False,
        accepts="base64, exactly 32 bytes",
        shown_default=_MADE_UP,
        description="AES-256 key sealing sandbox API keys and signing keys at rest",
    )
    webhook_secret: bytes | None = env_field(
        "CAVE_ROTATION_WEBHOOK_SECRET",
        None,
        secret_file=True,
        text=True,
        repr=False,
        accepts="`whsec_<base64>` or any text",
        shown_default="unset",
        description=(
            "Signs rotation webhooks (Standard Webhooks); `/api/v1/auth/keys/rotated` verifies "
            "it, and answers 404 without one"
        ),
    )
    webhook_url: str | None = env_field(
        "CAVE_ROTATION_WEBHOOK_URL",
        None,
        blank_is_unset=True,
        accepts="a URL",
        shown_default="unset",
        description="Where rotation webhooks go; unset: none are sent",
    )
    rotation_grace_s: float = env_field(
        "CAVE_KEY_ROTATION_GRACE_S",
        86400.0,
        ge=0,
        description="How long a rotated API key still works (seconds)",
    )
    secrets_dir: Path = env_field(
        "CAVE_SECRETS_DIR",
        DEFAULT_SECRETS_DIR,
        blank_is_unset=True,
        shown_default="`./var/secrets`",
        description=(
            "Where development keeps the secrets it generates (key pepper, sealing key), so "
            "that keys survive a restart; `cave up` makes it absolute"
        ),
    )


def load_auth_settings(
    env: Mapping[str, str] | None = None, secrets_dir: Path | None = None
) -> AuthSettings:
    """The settings from `env` (default os.environ); secrets missing outside production are
    generated once in `secrets_dir` (default CAVE_SECRETS_DIR)."""
    env = os.environ if env is None else env
    values, sources = read_env(AuthSettings, env)  # every secret may come from its NAME_FILE
    # Every process of a deployment must find the same development secrets, whatever its cwd.
    secrets_dir = secrets_dir or values.get("secrets_dir", DEFAULT_SECRETS_DIR)
    production = is_production(env)
    webhook: Any = values.get("webhook_secret")
    if production and values.get("webhook_url") and not webhook:
        # Without the secret the webhooks would silently not be sent: refuse, do not degrade.
        raise ConfigError(
            "CAVE_ROTATION_WEBHOOK_URL is set but CAVE_ROTATION_WEBHOOK_SECRET (or its _FILE) "
            "is not: CAVE_ENV=production sends no unsigned webhooks and drops none silently"
        )
    values.update(
        production=production,
        secrets_dir=secrets_dir,
        key_pepper=_secret(
            values.get("key_pepper"), "CAVE_KEY_PEPPER", 32, production, secrets_dir
        ),
        secret_key=_secret(
            values.get("secret_key"), "CAVE_SECRET_KEY", 32, production, secrets_dir, exact=True
        ),
        webhook_secret=webhook.encode() if webhook else None,
    )
    return validate(AuthSettings, values, sources)


def _secret(
    raw: str | None,
    name: str,
    size: int,
    production: bool,
    secrets_dir: Path,
    exact: bool = False,
) -> bytes:
    if raw:
        value = _decode(name, raw)
        if len(value) < size or (exact and len(value) != size):
            want = f"exactly {size}" if exact else f"at least {size}"
            raise ConfigError(f"{name} must decode to {want} bytes, got {len(value)}")
        return value
    if production:
        raise ConfigError(
            f"{name} is required when CAVE_ENV=production "
            f"(base64, {size} bytes; or {name}_FILE naming a file that holds it)"
        )
    return _development_secret(secrets_dir / name.lower(), size, name)


def _decode(name: str, raw: str) -> bytes:
    try:  # base64 with or without padding, standard or URL-safe alphabet
        standard = raw.strip().replace("-", "+").replace("_", "/")
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name} is not valid base64") from None


def _development_secret(path: Path, size: int, name: str) -> bytes:
    """A random secret kept on disk (0600), so that keys survive a restart outside production."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(size)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    try:
        os.link(staging, path)  # atomic, and fails if another process got there first
    except FileExistsError:
        value = path.read_bytes()
    finally:
        staging.unlink()
    log.warning("%s is not set: generated one in %s (development only)", name, path)
    return value
