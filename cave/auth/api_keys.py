"""The API key format: `cave_live_<key id>_<secret>`, of which only a peppered hash is stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cave.errors import AuthError

PREFIX = "cave_live_"
KEY_ID_CHARS = 12
SECRET_BYTES = 32
# The key id is public (it names the key in lists, logs and support requests) and indexes the
# lookup; the secret carries 256 bits of entropy, so a fast keyed hash is as good as a slow one.
_FORMAT = re.compile(r"^cave_live_([a-z2-7]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    plaintext: str  # shown once, never stored
    secret_hash: str

    @property
    def masked(self) -> str:
        return mask(self.plaintext)


def new_key(pepper: bytes) -> IssuedKey:
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:KEY_ID_CHARS]
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
    return IssuedKey(key_id, f"{PREFIX}{key_id}_{secret}", hash_secret(secret, pepper))


def parse(plaintext: str) -> tuple[str, str]:
    """(key id, secret) of a well-formed key; AuthError for anything else, saying nothing more."""
    match = _FORMAT.match(plaintext)
    if match is None:
        raise AuthError("malformed API key")
    return match.group(1), match.group(2)


def hash_secret(secret: str, pepper: bytes) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_hash: str, pepper: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret, pepper), stored_hash)


def mask(plaintext_or_id: str) -> str:
    """`cave_live_<key id>_****<last 4>` for a key, `cave_live_<key id>_****` for a bare id."""
    match = _FORMAT.match(plaintext_or_id)
    if match is not None:
        return f"{PREFIX}{match.group(1)}_****{match.group(2)[-4:]}"
    return f"{PREFIX}{plaintext_or_id}_****"
