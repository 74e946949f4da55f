"""AES-256-GCM sealing of secrets kept in the database (model signing keys), bound to their row."""

from __future__ import annotations

import base64
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cave.errors import ConfigError, InvalidArgumentError

VERSION = "v1"
NONCE_BYTES = 12


def check_key(key: bytes, variable: str = "CAVE_SECRET_KEY") -> bytes:
    if len(key) != 32:
        raise ConfigError(f"{variable} must decode to 32 bytes (AES-256), got {len(key)}")
    return key


def seal(key: bytes, plaintext: str, context: str) -> str:
    """`v1:<base64 nonce+ciphertext>`; `context` (e.g. the sandbox id) is authenticated, so a
    sealed value copied to another row does not open there."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(check_key(key)).encrypt(nonce, plaintext.encode(), context.encode())
    return f"{VERSION}:{base64.b64encode(nonce + sealed).decode()}"


def unseal(key: bytes, token: str, context: str) -> str:
    version, _, payload = token.partition(":")
    if version != VERSION:
        raise InvalidArgumentError(f"unknown sealed-secret version {version!r}")
    raw = base64.b64decode(payload)
    try:
        plain = AESGCM(check_key(key)).decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()
        )
    except InvalidTag:
        raise InvalidArgumentError(
            "sealed secret does not open with this key and context"
        ) from None
    return plain.decode()
