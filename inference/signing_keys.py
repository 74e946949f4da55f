"""SigningKeys: the Ed25519 keys that sign model-access tokens, kept in the database, cached here.

Every replica reads the same `signing_keys` rows, so a token signed by one verifies on all. One key
signs at a time (the newest not retired); a retired key keeps verifying until `expires_at`, which
rotation sets past the expiry of the last token it can have signed. Private keys are sealed with
CAVE_SECRET_KEY (AES-GCM) and bound to their kid.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from sqlalchemy import or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from cave.auth.sealing import check_key, seal, unseal
from cave.db import Database, SigningKeyRow, new_id, utcnow
from cave.errors import ConfigError, InvalidArgumentError, ServiceUnavailableError
from config.llm import LlmSettings

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
REFRESH_S = 5.0  # how stale a replica's view may get (another replica rotated)
MISS_REFRESH_S = 1.0  # unknown kids reload at most this often: random kids must not flood the db
SKEW_S = 60  # replicas' clocks disagree a little; a retired key verifies this much longer
# Serialises key creation and rotation on PostgreSQL; SQLite write transactions begin IMMEDIATE.
_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('cave.signing_keys'))")


@dataclass(frozen=True, slots=True)
class ActiveSigningKey:
    """The key that signs new tokens now."""

    kid: str
    private_key: Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class PublicSigningKey:
    """A key that still verifies: the active one and retired ones not yet expired."""

    kid: str
    key: Ed25519PublicKey
    x: str  # the raw public key, base64url without padding (the JWK's "x")
    created_at: datetime
    retired_at: datetime | None
    expires_at: datetime | None

    def jwk(self) -> dict[str, str]:
        return public_jwk(self.kid, self.x)


@dataclass(frozen=True, slots=True)
class _Ring:
    """One snapshot of the table, as parsed keys; replaced whole, never changed."""

    loaded_at: float  # time.monotonic() when the read began
    signer: ActiveSigningKey | None
    keys: dict[str, PublicSigningKey]
    trusted: dict[str, tuple[Ed25519PublicKey, float]]  # kid -> key, expiry (epoch s): hot path


class SigningKeys:
    """The signing keys of this deployment; one per process, shared by signer and verifier."""

    def __init__(
        self,
        db: Database,
        secret_key: bytes,
        settings: LlmSettings,
        refresh_s: float = REFRESH_S,
        miss_refresh_s: float = MISS_REFRESH_S,
    ) -> None:
        self._db = db
        self._secret_key = check_key(secret_key)
        self._settings = settings
        self._refresh_s = refresh_s
        self._miss_refresh_s = miss_refresh_s
        self._ring: _Ring | None = None
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[None] | None = None

    @property
    def retire_after_s(self) -> float:
        """How long a retired key keeps verifying: the longest token, plus the time another
        replica may still sign with it (its stale view), the verifier's leeway and clock skew."""
        settings = self._settings
        return settings.token_max_ttl_s + self._refresh_s + settings.leeway_s + SKEW_S

    async def current(self) -> ActiveSigningKey:
        """The key that signs now; the first call of a new deployment creates it."""
        ring = await self._fresh_ring()
        if ring.signer is None:
            await self._create_first()
            ring = await self._reload()
        if ring.signer is None:  # retired between our insert and our read: nothing signs
            raise ConfigError("no active signing key: rotate the model-access signing keys")
        return ring.signer

    async def rotate(self, *, compromised: bool = False) -> str:
        """A new key signs from now on; returns its kid. The old key keeps verifying until its
        last token has expired, or stops at once when `compromised` (its tokens die with it)."""
        now = utcnow()
        until = now if compromised else now + timedelta(seconds=self.retire_after_s)
        row = self._new_row()
        async with self._db.admin_session() as session:
            await self._lock_table(session)
            for old in await session.scalars(_active()):
                old.retired_at = now
                old.expires_at = until
            session.add(row)
        await self._reload()
        return row.kid

    async def public_keys(self) -> list[PublicSigningKey]:
        """Every key that still verifies, newest first."""
        ring = await self._fresh_ring()
        now = time.time()
        keys = [key for key in ring.keys.values() if now < ring.trusted[key.kid][1]]
        return sorted(keys, key=lambda key: key.created_at, reverse=True)

    async def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS document (RFC 7517) of every key that still verifies."""
        return {"keys": [key.jwk() for key in await self.public_keys()]}

    def signer_now(self) -> ActiveSigningKey:
        """The key that signs now, from memory (no database): for signing inside a transaction.
        `await current()` once at start-up; a stale view is refreshed in the background."""
        ring = self._loaded_ring()
        if ring.signer is None:
            raise ServiceUnavailableError("no active signing key yet: await current() first")
        return ring.signer

    def trusted_key(self, kid: str) -> Ed25519PublicKey | None:
        """The key that verifies tokens of `kid` now, or None (unknown, or expired), from memory:
        the hot path. An unknown kid asks for a background reload (at most once a second)."""
        ring = self._loaded_ring()
        found = ring.trusted.get(kid)
        if found is None:
            if time.monotonic() - ring.loaded_at > self._miss_refresh_s:
                self._reload_soon()
            return None
        return found[0] if time.time() < found[1] else None

    async def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """As `trusted_key`, but an unknown kid waits for the reload (at most once a second)."""
        ring = await self._fresh_ring()
        if kid not in ring.trusted and time.monotonic() - ring.loaded_at > self._miss_refresh_s:
            await self._reload()  # perhaps another replica has just rotated
        return self.trusted_key(kid)

    async def refresh(self) -> None:
        """Read the table again now (the cache does so by itself every `refresh_s`)."""
        await self._reload()

    def _loaded_ring(self) -> _Ring:
        ring = self._ring
        if ring is None:
            raise ServiceUnavailableError("signing keys not loaded yet: await current() first")
        if time.monotonic() - ring.loaded_at > self._refresh_s:
            self._reload_soon()  # meanwhile the stale view serves: keys change rarely
        return ring

    def _reload_soon(self) -> None:
        if self._pending is not None and not self._pending.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop here: the next awaited call reloads
        self._pending = loop.create_task(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        try:
            await self._reload()
        except Exception as error:  # any failure: the request that asked was served already
            log.warning("reloading the signing keys failed: %s: %s", type(error).__name__, error)

    async def _fresh_ring(self) -> _Ring:
        ring = self._ring
        if ring is None or time.monotonic() - ring.loaded_at > self._refresh_s:
            return await self._reload()
        return ring

    async def _reload(self) -> _Ring:
        asked = time.monotonic()
        async with self._lock:
            ring = self._ring
            if ring is not None and ring.loaded_at >= asked:
                return ring  # another task read the table while this one waited
            started = time.monotonic()
            async with self._db.read_session(None) as session:
                rows = (await session.scalars(_verifying(utcnow()))).all()
            self._ring = self._parse(rows, started)
            return self._ring

    def _parse(self, rows: Sequence[SigningKeyRow], loaded_at: float) -> _Ring:
        before = self._ring
        keys: dict[str, PublicSigningKey] = {}
        for row in rows:
            known = before.keys.get(row.kid) if before is not None else None
            same = known is not None and known.x == row.public_key
            key = known.key if same and known is not None else parse_public_key(row.public_key)
            keys[row.kid] = PublicSigningKey(
                row.kid, key, row.public_key, row.created_at, row.retired_at, row.expires_at
            )
        trusted = {kid: (key.key, _epoch(key.expires_at)) for kid, key in keys.items()}
        active = max(
            (row for row in rows if row.retired_at is None),
            key=lambda row: row.created_at,
            default=None,
        )
        signer = before.signer if before is not None else None
        if active is None:
            signer = None
        elif signer is None or signer.kid != active.kid:
            signer = self._open(active)
        return _Ring(loaded_at, signer, keys, trusted)

    def _open(self, row: SigningKeyRow) -> ActiveSigningKey:
        try:
            raw = _b64decode(unseal(self._secret_key, row.sealed_private_key, row.kid))
            private = Ed25519PrivateKey.from_private_bytes(raw)
        except (InvalidArgumentError, ValueError) as error:
            raise ConfigError(
                f"CAVE_SECRET_KEY does not open signing key {row.kid}: {error}"
            ) from None
        return ActiveSigningKey(row.kid, private)

    async def _create_first(self) -> None:
        # Under the lock, so that replicas starting together end with one active key.
        async with self._db.admin_session() as session:
            await self._lock_table(session)
            if await session.scalar(_active().limit(1)) is None:
                session.add(self._new_row())

    async def _lock_table(self, session: AsyncSession) -> None:
        if self._db.backend == "postgresql":
            await session.execute(_LOCK)

    def _new_row(self) -> SigningKeyRow:
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        kid = new_id()
        return SigningKeyRow(
            kid=kid,
            algorithm=ALGORITHM,
            public_key=_b64encode(public),
            sealed_private_key=seal(self._secret_key, _b64encode(raw), kid),
            created_at=utcnow(),
        )


def public_jwk(kid: str, x: str) -> dict[str, str]:
    """The JWK (RFC 8037) of an Ed25519 public key given as base64url `x`."""
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def parse_jwks(document: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 signing keys of a JWKS document by kid; keys of other types or uses are
    skipped, a malformed Ed25519 key is an InvalidArgumentError."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise InvalidArgumentError("a JWKS document needs a list of keys")
    found: dict[str, Ed25519PublicKey] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not kid or not isinstance(x, str):
            raise InvalidArgumentError("an Ed25519 JWK needs a string kid and x")
        found[kid] = parse_public_key(x)
    return found


def parse_public_key(x: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(_b64decode(x))
    except ValueError:
        raise InvalidArgumentError("not an Ed25519 public key (32 bytes, base64url)") from None


def _active() -> Any:
    return select(SigningKeyRow).where(SigningKeyRow.retired_at.is_(None))


def _verifying(now: datetime) -> Any:
    expires_at = SigningKeyRow.expires_at
    return select(SigningKeyRow).where(or_(expires_at.is_(None), expires_at > now))


def _epoch(moment: datetime | None) -> float:
    return math.inf if moment is None else moment.timestamp()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
