"""Model-access tokens: Ed25519 JWTs (the RFC 9068 profile), issued by TokenSigner and checked
by TokenVerifier against the signing keys, peers' keys and the revocation set, all in memory.

A token's header is `{"alg": "EdDSA", "typ": "at+jwt", "kid": ...}`; its claims are
`iss aud sub model_id cave_ns scopes iat nbf exp jti`, `jti` being the id of its
`model_access_tokens` row, and `cave_rpm cave_tpm`: the key's own requests and tokens per minute
(0: no limit), signed so that no replica needs the database to know them; a token without them
(a peer's, or one issued before they existed) gets the gateway's defaults. Verification pins
the algorithm (RFC 8725): `none`, HMAC with the public key as secret, RSA and every other `alg`
fail before any key is used.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cave.auth.keys import ForbiddenError
from cave.db import ModelAccessTokenRow, new_id
from cave.errors import (
    AuthError,
    InvalidArgumentError,
    LimitExceededError,
    NamespaceMismatchError,
    TokenExpiredError,
    TokenRevokedError,
)
from config.llm import MAX_PER_MINUTE, LlmSettings
from inference.revocation import RevocationCache
from inference.signing_keys import ALGORITHM, SigningKeys, parse_jwks

TOKEN_TYPE = "at+jwt"
_TYPES = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068 allows both spellings
CHAT_SCOPE = "llm:chat"
_STRINGS = ("iss", "sub", "model_id", "cave_ns", "jti")
_REQUIRED = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti")  # RFC 9068's, checked first
# Three base64url segments without padding (RFC 7515 §7.1), the signature's empty for "alg":
# "none" (refused by the header check, with that reason): nothing else gets near a parser.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_TOKEN_CHARS = 8192  # ours are about 500; longer ones are refused before any parsing
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ModelClaims:
    """What a verified model-access token says; times are seconds since the epoch."""

    iss: str
    aud: str
    sub: str
    model_id: str
    cave_ns: str
    scopes: tuple[str, ...]
    iat: int
    nbf: int
    exp: int
    jti: str
    kid: str
    rpm: int | None = None  # None: the gateway's default (CAVE_LLM_RPM); 0: no limit
    tpm: int | None = None

    @property
    def issued_at(self) -> datetime:
        return datetime.fromtimestamp(self.iat, UTC)

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.exp, UTC)

    def payload(self) -> dict[str, Any]:
        """The JWT claims set (`kid` travels in the header)."""
        names = ("iss", "aud", "sub", "model_id", "cave_ns", "iat", "nbf", "exp", "jti")
        payload = {**{name: getattr(self, name) for name in names}, "scopes": list(self.scopes)}
        limits = {"cave_rpm": self.rpm, "cave_tpm": self.tpm}
        return payload | {name: value for name, value in limits.items() if value is not None}


def token_row(claims: ModelClaims, request_id: str) -> ModelAccessTokenRow:
    """The `model_access_tokens` row of an issued token, to insert with the approval."""
    return ModelAccessTokenRow(
        id=claims.jti,
        request_id=request_id,
        namespace_id=claims.cave_ns,
        model_id=claims.model_id,
        kid=claims.kid,
        issued_at=claims.issued_at,
        expires_at=claims.expires_at,
        rpm=claims.rpm,
        tpm=claims.tpm,
    )


class TokenSigner:
    """Issues model-access tokens with the active signing key, from memory: safe to call inside
    the approval's transaction once `await SigningKeys.current()` has run at start-up."""

    def __init__(self, keys: SigningKeys, settings: LlmSettings) -> None:
        self._keys = keys
        self._settings = settings

    def issue(
        self,
        sub: str,
        model_id: str,
        cave_ns: str,
        scopes: Sequence[str],
        ttl_s: int | None = None,
        jti: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[str, ModelClaims]:
        """A signed token and its claims; `jti` (default: a new id) names its database row;
        `rpm`/`tpm` (default: the settings') are signed into it (0: no limit)."""
        ttl = self._ttl(ttl_s)
        rpm = self._settings.rpm if rpm is None else _per_minute("rpm", rpm)
        tpm = self._settings.tpm if tpm is None else _per_minute("tpm", tpm)
        fields = {"sub": sub, "model_id": model_id, "cave_ns": cave_ns, "jti": jti or new_id()}
        for name, value in fields.items():
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{name} must be a non-empty string")
        if not scopes or not all(isinstance(s, str) and s for s in scopes):
            raise InvalidArgumentError("a model-access token needs at least one scope")
        key = self._keys.signer_now()
        now = int(time.time())
        claims = ModelClaims(
            iss=self._settings.issuer,
            aud=self._settings.audience,
            scopes=tuple(scopes),
            iat=now,
            nbf=now,
            exp=now + ttl,
            kid=key.kid,
            rpm=rpm,
            tpm=tpm,
            **fields,
        )
        headers = {"typ": TOKEN_TYPE, "kid": key.kid}
        token = jwt.encode(claims.payload(), key.private_key, algorithm=ALGORITHM, headers=headers)
        return token, claims

    def _ttl(self, ttl_s: int | None) -> int:
        if ttl_s is None:
            return self._settings.token_ttl_s
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
            raise InvalidArgumentError(f"ttl_s must be whole seconds > 0, got {ttl_s!r}")
        if ttl_s > self._settings.token_max_ttl_s:
            raise LimitExceededError(
                f"ttl_s={ttl_s} is longer than the maximum {self._settings.token_max_ttl_s}"
            )
        return ttl_s


class PeerKeys:
    """Public keys of peer clusters, by (issuer, kid), from their JWKS documents."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], Ed25519PublicKey] = {}

    def set_jwks(self, issuer: str, document: Mapping[str, Any]) -> None:
        """Trust exactly the Ed25519 keys of `document` for tokens that `issuer` signs."""
        found = parse_jwks(document)  # parsed first: a bad document changes nothing
        kept = {ref: key for ref, key in self._keys.items() if ref[0] != issuer}
        self._keys = kept | {(issuer, kid): key for kid, key in found.items()}

    def forget(self, issuer: str) -> None:
        self._keys = {ref: key for ref, key in self._keys.items() if ref[0] != issuer}

    def get(self, issuer: str, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get((issuer, kid))


class _UnknownKeyError(AuthError):
    """The token names a kid nobody here knows (perhaps not yet: another replica rotated)."""

    def __init__(self, message: str, kid: str) -> None:
        super().__init__(message)
        self.kid = kid


class TokenVerifier:
    """Checks model-access tokens in memory; a verified token is remembered (bounded), so a
    key used for many requests pays for its signature once; expiry, keys and revocation are
    checked again on every call."""

    def __init__(
        self,
        keys: SigningKeys,
        revocations: RevocationCache,
        settings: LlmSettings,
        peers: PeerKeys | None = None,
        cache_size: int = VERIFIED_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._settings = settings
        self._peers = peers
        self._cache_size = cache_size
        self._verified: dict[str, ModelClaims] = {}
        self._clock = clock

    def verify(
        self, token: str, namespace: str | None, model: str | None, scope: str = CHAT_SCOPE
    ) -> ModelClaims:
        """The token's claims when it may call `model` in `namespace` with `scope` (None: not
        checked), else AuthError / TokenExpiredError (401) or TokenRevokedError,
        NamespaceMismatchError, ForbiddenError (403), or RevocationsStaleError (503) when the
        revocation set is too old to trust. Never touches the database."""
        known = self._verified.get(token)
        if known is not None and self._key_of(known) is not None:
            claims = known  # its signature was checked; the key still verifies
        else:
            claims = self._check_signature(token)
        self._check_time(token, claims)
        if claims is not known:
            self._remember(token, claims)
        self._revocations.check_fresh()  # a stale view vouches for nothing: 503, not a pass
        if self._revocations.is_revoked(claims.jti):
            raise TokenRevokedError(f"model-access key {claims.jti} has been revoked")
        if namespace is not None and claims.cave_ns != namespace:
            raise NamespaceMismatchError(
                f"this model-access key is for namespace {claims.cave_ns!r}, not {namespace!r}"
            )
        if model is not None and claims.model_id != model:
            raise ForbiddenError(
                f"this model-access key is for model {claims.model_id!r}, not {model!r}"
            )
        if scope not in claims.scopes:
            raise ForbiddenError(f"this model-access key lacks the scope {scope!r}")
        return claims

    async def averify(
        self, token: str, namespace: str | None, model: str | None, scope: str = CHAT_SCOPE
    ) -> ModelClaims:
        """As `verify`, but a kid not known here waits for one reload of the signing keys (at
        most once a second) before the token is refused: a key just rotated on another replica."""
        try:
            return self.verify(token, namespace, model, scope)
        except _UnknownKeyError as error:
            if await self._keys.public_key(error.kid) is None:
                raise
        return self.verify(token, namespace, model, scope)

    def _key_of(self, claims: ModelClaims) -> Ed25519PublicKey | None:
        if claims.iss == self._settings.issuer:
            return self._keys.trusted_key(claims.kid)
        return None if self._peers is None else self._peers.get(claims.iss, claims.kid)

    def _check_signature(self, token: str) -> ModelClaims:
        kid = _header_kid(token)
        key, issuer = self._key_for(token, kid)
        payload = _verified_payload(token, key, self._settings.audience, issuer)
        claims = _claims(payload, kid, self._settings.audience)
        if issuer == self._settings.issuer and claims.exp - claims.iat > self._max_life_s():
            raise AuthError("model-access key lives longer than any key this cluster issues")
        return claims

    def _remember(self, token: str, claims: ModelClaims) -> None:
        if self._cache_size <= 0:
            return
        if len(self._verified) >= self._cache_size:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = claims

    def _key_for(self, token: str, kid: str) -> tuple[Ed25519PublicKey, str]:
        own = self._keys.trusted_key(kid)
        if own is not None:
            return own, self._settings.issuer
        issuer = _unverified_issuer(token) if self._peers is not None else None
        if self._peers is not None and issuer is not None and issuer != self._settings.issuer:
            peer = self._peers.get(issuer, kid)
            if peer is not None:
                return peer, issuer
        raise _UnknownKeyError("model-access key signed by an unknown or expired key", kid)

    def _check_time(self, token: str, claims: ModelClaims) -> None:
        # Again on every call: a remembered token expires like any other.
        now, leeway = self._clock(), self._settings.leeway_s
        if claims.exp <= now - leeway:
            self._verified.pop(token, None)
            raise TokenExpiredError("model-access key has expired")
        if claims.nbf > now + leeway or claims.iat > now + leeway:
            raise AuthError("model-access key is not valid yet")

    def _max_life_s(self) -> int:
        return self._settings.token_max_ttl_s + 2 * self._settings.leeway_s


def _header_kid(token: str) -> str:
    """The kid of a well-formed header that pins our algorithm and type; AuthError otherwise."""
    # The length first: nothing longer reaches even the regular expression.
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _COMPACT.fullmatch(token):
        raise AuthError("malformed model-access key")
    header = _json_part(token.partition(".")[0])
    if header.get("alg") != ALGORITHM:
        raise AuthError(f"model-access key algorithm must be {ALGORITHM}")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _TYPES:
        raise AuthError(f"model-access key type must be {TOKEN_TYPE}")
    if "crit" in header:  # extensions we do not understand must not be ignored (RFC 7515)
        raise AuthError("model-access key has critical header parameters")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError("model-access key names no signing key (kid)")
    return kid


def _verified_payload(
    token: str, key: Ed25519PublicKey, audience: str, issuer: str
) -> dict[str, Any]:
    """The claims of a compact JWS (RFC 7515) whose Ed25519 signature `key` verifies, naming
    `audience` (alone or in a list) and `issuer`. The length, the characters (_COMPACT) and the
    header were checked by _header_kid; times are checked by _check_time, on remembered tokens too.

    Not pyjwt's decode: since 2.15 it checks each character of a token in a Python loop, a
    quarter of a verification's time; the checks are the same (an alphabet check, a signature
    segment in canonical base64, so that one token has one spelling, the required claims)."""
    signing_input, _, encoded = token.rpartition(".")
    try:
        signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except binascii.Error:
        raise AuthError("malformed model-access key") from None
    if base64.urlsafe_b64encode(signature).rstrip(b"=").decode() != encoded:
        raise AuthError("malformed model-access key")
    try:
        key.verify(signature, signing_input.encode("ascii"))
    except InvalidSignature:
        raise AuthError("model-access key signature does not verify") from None
    payload = _json_part(signing_input.partition(".")[2])
    missing = [name for name in _REQUIRED if name not in payload]
    if missing:
        raise AuthError(f"model-access key lacks the claim {missing[0]!r}")
    audiences = payload["aud"] if isinstance(payload["aud"], list) else [payload["aud"]]
    if audience not in audiences:
        raise AuthError("model-access key is for another audience")
    if payload["iss"] != issuer:
        raise AuthError("model-access key is from another issuer")
    return payload


def _unverified_issuer(token: str) -> str | None:
    # Only to choose a peer's key: the signature check that follows pins the issuer.
    try:
        issuer = _json_part(token.split(".")[1]).get("iss")
    except AuthError:
        return None
    return issuer if isinstance(issuer, str) else None


def _json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError included
        raise AuthError("malformed model-access key") from None
    if not isinstance(value, dict):
        raise AuthError("malformed model-access key")
    return value


def _claims(payload: dict[str, Any], kid: str, audience: str) -> ModelClaims:
    missing = [name for name in (*_STRINGS, "scopes") if name not in payload]
    if missing:
        raise AuthError(f"model-access key lacks the claims {missing}")
    if not all(isinstance(payload[name], str) and payload[name] for name in _STRINGS):
        raise AuthError("model-access key has a malformed claim")
    scopes = payload["scopes"]
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise AuthError("model-access key scopes must be a list of strings")
    if not all(_is_time(payload[name]) for name in ("iat", "nbf", "exp")):
        raise AuthError("model-access key times must be seconds since the epoch")
    limits = [payload.get(name) for name in ("cave_rpm", "cave_tpm")]
    if not all(value is None or _is_count(value) for value in limits):
        raise AuthError("model-access key limits must be whole numbers >= 0")
    return ModelClaims(
        iss=payload["iss"],
        aud=audience,  # _verified_payload has checked that it is, or contains, ours
        sub=payload["sub"],
        model_id=payload["model_id"],
        cave_ns=payload["cave_ns"],
        scopes=tuple(scopes),
        iat=int(payload["iat"]),
        nbf=int(payload["nbf"]),
        exp=int(payload["exp"]),
        jti=payload["jti"],
        kid=kid,
        rpm=limits[0],
        tpm=limits[1],
    )


def _per_minute(name: str, value: int) -> int:
    if not _is_count(value) or value > MAX_PER_MINUTE:
        raise InvalidArgumentError(f"{name} must be a whole number in [0, {MAX_PER_MINUTE}]")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**40
