"""Signing keys on SQLite and PostgreSQL: first key, rotation, expiry, JWKS, sealing, replicas."""

from __future__ import annotations

import asyncio
import base64
import secrets

import jwt
import pytest
from sqlalchemy import select

from cave.db import Database, SigningKeyRow
from cave.errors import AuthError, ConfigError
from config.llm import LlmSettings
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import TokenSigner, TokenVerifier
from tests.db.conftest import Target

pytestmark = pytest.mark.anyio

NS, MODEL = "ns-a", "tiny-chat"


async def _rows(target: Target) -> list[tuple[str, object, object]]:
    return await target.raw("SELECT kid, retired_at, expires_at FROM signing_keys")


async def test_replicas_starting_together_create_one_key(
    db: Database, target: Target, secret_key: bytes, llm_settings: LlmSettings
) -> None:
    replicas = [await Database.connect(target.settings) for _ in range(6)]
    try:
        keys = [SigningKeys(replica, secret_key, llm_settings) for replica in replicas]
        active = await asyncio.gather(*(k.current() for k in keys))
    finally:
        for replica in replicas:
            await replica.close()
    assert len({key.kid for key in active}) == 1
    rows = await _rows(target)
    assert [kid for kid, _, _ in rows] == [active[0].kid]


async def test_a_restarted_replica_signs_and_verifies_with_the_same_key(
    db: Database, target: Target, secret_key: bytes, llm_settings: LlmSettings
) -> None:
    first = SigningKeys(db, secret_key, llm_settings)
    kid = (await first.current()).kid
    token, claims = TokenSigner(first, llm_settings).issue("k", MODEL, NS, ["llm:chat"])
    async with await Database.connect(target.settings) as restarted:
        again = SigningKeys(restarted, secret_key, llm_settings)
        assert (await again.current()).kid == kid
        revocations = RevocationCache(restarted)
        await revocations.refresh()  # as the gateway does at start-up, before serving
        verifier = TokenVerifier(again, revocations, llm_settings)
        assert verifier.verify(token, NS, MODEL) == claims


async def test_rotation_signs_with_the_new_key_and_keeps_the_old_one_until_it_expires(
    keys: SigningKeys,
    signer: TokenSigner,
    verifier: TokenVerifier,
    target: Target,
    llm_settings: LlmSettings,
) -> None:
    old_token, old_claims = signer.issue("k", MODEL, NS, ["llm:chat"], llm_settings.token_max_ttl_s)
    new_kid = await keys.rotate()
    new_token, new_claims = signer.issue("k", MODEL, NS, ["llm:chat"])
    assert (new_claims.kid, jwt.get_unverified_header(new_token)["kid"]) == (new_kid, new_kid)
    assert old_claims.kid != new_kid
    assert verifier.verify(old_token, NS, MODEL) == old_claims
    assert verifier.verify(new_token, NS, MODEL) == new_claims
    assert [key["kid"] for key in (await keys.jwks())["keys"]] == [new_kid, old_claims.kid]
    # The old key outlives the longest token it signed, leeway included.
    retired = {key.kid: key for key in await keys.public_keys()}[old_claims.kid]
    assert retired.retired_at is not None and retired.expires_at is not None
    assert retired.expires_at.timestamp() >= old_claims.exp + llm_settings.leeway_s
    # Once that moment has come (here: moved to the past), its tokens verify no more.
    await target.raw(
        "UPDATE signing_keys SET expires_at = retired_at WHERE kid = $1", old_claims.kid
    )
    await keys.refresh()
    with pytest.raises(AuthError, match="unknown or expired key"):
        verifier.verify(old_token, NS, MODEL)
    assert verifier.verify(new_token, NS, MODEL) == new_claims
    assert [key["kid"] for key in (await keys.jwks())["keys"]] == [new_kid]


async def test_a_compromised_key_stops_verifying_at_once(
    keys: SigningKeys, signer: TokenSigner, verifier: TokenVerifier
) -> None:
    token, claims = signer.issue("k", MODEL, NS, ["llm:chat"])
    assert verifier.verify(token, NS, MODEL) == claims  # and remembered as verified
    await keys.rotate(compromised=True)
    with pytest.raises(AuthError, match="unknown or expired key"):
        verifier.verify(token, NS, MODEL)
    assert [key["kid"] for key in (await keys.jwks())["keys"]] == [(await keys.current()).kid]


async def test_one_key_is_active_after_concurrent_rotations(
    db: Database, target: Target, secret_key: bytes, llm_settings: LlmSettings
) -> None:
    replicas = [await Database.connect(target.settings) for _ in range(4)]
    try:
        await SigningKeys(replicas[0], secret_key, llm_settings).current()
        keys = [SigningKeys(replica, secret_key, llm_settings) for replica in replicas]
        await asyncio.gather(*(k.rotate() for k in keys))
    finally:
        for replica in replicas:
            await replica.close()
    rows = await _rows(target)
    assert len(rows) == 5
    assert len([kid for kid, retired_at, _ in rows if retired_at is None]) == 1


async def test_the_jwks_document_verifies_issued_tokens(
    keys: SigningKeys, signer: TokenSigner
) -> None:
    token, claims = signer.issue("k", MODEL, NS, ["llm:chat"])
    (jwk,) = (await keys.jwks())["keys"]
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": jwk["x"],
        "kid": claims.kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    assert len(base64.urlsafe_b64decode(jwk["x"] + "=")) == 32
    # An independent verifier, knowing only the published JWK.
    public = jwt.PyJWK(jwk).key
    payload = jwt.decode(token, public, algorithms=["EdDSA"], audience="cave-llm", issuer="cave")
    assert payload["jti"] == claims.jti


async def test_private_keys_are_sealed_with_the_secret_key(
    keys: SigningKeys, target: Target, db: Database, llm_settings: LlmSettings
) -> None:
    active = await keys.current()
    raw = active.private_key.private_bytes_raw()
    [(sealed,)] = await target.raw("SELECT sealed_private_key FROM signing_keys")
    assert sealed.startswith("v1:")
    for encoding in (base64.b64encode, base64.urlsafe_b64encode):
        assert encoding(raw).decode().rstrip("=") not in sealed
    stranger = SigningKeys(db, secrets.token_bytes(32), llm_settings)
    with pytest.raises(ConfigError, match="CAVE_SECRET_KEY does not open signing key"):
        await stranger.current()


async def test_a_namespace_session_sees_no_signing_key(keys: SigningKeys, db: Database) -> None:
    # Row-level security on PostgreSQL, the ORM filter on SQLite: only an admin reads it.
    async with db.namespace_session(NS) as session:
        assert (await session.scalars(select(SigningKeyRow))).all() == []
    async with db.admin_session() as session:
        assert len((await session.scalars(select(SigningKeyRow))).all()) == 1
