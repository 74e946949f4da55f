"""Secrets of the access-control layer, from CAVE_* variables; production refuses made-up ones."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cave.env import env_secret
from cave.errors import ConfigError

log = logging.getLogger("cave.auth")
DEFAULT_SECRETS_DIR = Path("var/secrets")


@dataclass(frozen=True)
class AuthSettings:
    production: bool
    key_pepper: bytes  # CAVE_KEY_PEPPER: keys the hash of every API key secret
    secret_key: bytes  # CAVE_SECRET_KEY: AES-256 key sealing sandbox API keys at rest
    webhook_secret: bytes | None  # CAVE_ROTATION_WEBHOOK_SECRET
    webhook_url: str | None  # CAVE_ROTATION_WEBHOOK_URL
    rotation_grace_s: float  # CAVE_KEY_ROTATION_GRACE_S: how long a rotated key still works


def load_auth_settings(
    env: Mapping[str, str] | None = None, secrets_dir: Path | None = None
) -> AuthSettings:
    env = os.environ if env is None else env
    # Every process of a deployment must find the same development secrets, whatever its cwd.
    secrets_dir = secrets_dir or Path(env.get("CAVE_SECRETS_DIR") or DEFAULT_SECRETS_DIR)
    production = env.get("CAVE_ENV", "development").strip().lower() == "production"
    grace = env.get("CAVE_KEY_ROTATION_GRACE_S", "86400")
    try:
        grace_s = float(grace)
        if not grace_s >= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"CAVE_KEY_ROTATION_GRACE_S={grace!r}: expected seconds >= 0") from None
    webhook = env_secret(env, "CAVE_ROTATION_WEBHOOK_SECRET")
    webhook_url = env.get("CAVE_ROTATION_WEBHOOK_URL") or None
    if production and webhook_url and not webhook:
        # Without the secret the webhooks would silently not be sent: refuse, do not degrade.
        raise ConfigError(
            "CAVE_ROTATION_WEBHOOK_URL is set but CAVE_ROTATION_WEBHOOK_SECRET (or its _FILE) "
            "is not: CAVE_ENV=production sends no unsigned webhooks and drops none silently"
        )
    return AuthSettings(
        production=production,
        key_pepper=_secret(env, "CAVE_KEY_PEPPER", 32, production, secrets_dir),
        secret_key=_secret(env, "CAVE_SECRET_KEY", 32, production, secrets_dir, exact=True),
        webhook_secret=webhook.encode() if webhook else None,
        webhook_url=webhook_url,
        rotation_grace_s=grace_s,
    )


def _secret(
    env: Mapping[str, str],
    name: str,
    size: int,
    production: bool,
    secrets_dir: Path,
    exact: bool = False,
) -> bytes:
    raw = env_secret(env, name)
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
