"""The revocation set on SQLite and PostgreSQL: what a refresh reads, keeps, drops, and when."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

import jwt
import pytest
from sqlalchemy import update

from cave.db import (
    Database,
    ModelAccessRequestRow,
    ModelAccessTokenRow,
    NamespaceRow,
    new_id,
    utcnow,
)
from cave.errors import RevocationsStaleError, TokenRevokedError
from config.llm import LlmSettings
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import ModelClaims, TokenSigner, TokenVerifier, token_row
from tests.db.conftest import Target

pytestmark = pytest.mark.anyio

MODEL = "tiny-chat"
T = TypeVar("T")
NAMESPACES = ("ns-a", "ns-b")


@pytest.fixture
async def approved(db: Database) -> Database:
    """ns-a and ns-b, each with an approved request for MODEL (id `req-<namespace>`)."""
    async with db.admin_session() as session:
        session.add_all(NamespaceRow(id=ns, name=ns) for ns in NAMESPACES)
        await session.flush()
        session.add_all(
            ModelAccessRequestRow(
                id=f"req-{ns}",
                namespace_id=ns,
                model_id=MODEL,
                scopes=["llm:chat"],
                ttl_s=600,
                state="approved",
                requested_by="key-1",
            )
            for ns in NAMESPACES
        )
    return db


async def _issue(db: Database, signer: TokenSigner, namespace: str) -> tuple[str, ModelClaims]:
    """A token and its row, as the approval writes them."""
    token, claims = signer.issue("key-1", MODEL, namespace, ["llm:chat"], 600)
    async with db.admin_session() as session:
        session.add(token_row(claims, f"req-{namespace}"))
    return token, claims


async def _revoke(db: Database, jti: str, at: datetime | None = None) -> None:
    async with db.admin_session() as session:
        await session.execute(
            update(ModelAccessTokenRow)
            .where(ModelAccessTokenRow.id == jti)
            .values(revoked_at=at or utcnow())
        )


async def test_a_refresh_reads_the_revocations_of_every_namespace(
    approved: Database, signer: TokenSigner, verifier: TokenVerifier, revocations: RevocationCache
) -> None:
    issued = {ns: [await _issue(approved, signer, ns) for _ in range(2)] for ns in NAMESPACES}
    revoked = [issued["ns-a"][0][1], issued["ns-b"][1][1]]
    for claims in revoked:
        await _revoke(approved, claims.jti)
    assert await revocations.refresh() == 2
    for ns, tokens in issued.items():
        for token, claims in tokens:
            if claims in revoked:
                assert revocations.is_revoked(claims.jti)
                with pytest.raises(TokenRevokedError):
                    verifier.verify(token, ns, MODEL)
            else:
                assert not revocations.is_revoked(claims.jti)
                assert verifier.verify(token, ns, MODEL) == claims


async def test_expired_tokens_are_neither_read_nor_kept(
    approved: Database, revocations: RevocationCache
) -> None:
    past = utcnow() - timedelta(minutes=5)
    async with approved.admin_session() as session:
        session.add(
            ModelAccessTokenRow(
                id="old",
                request_id="req-ns-a",
                namespace_id="ns-a",
                model_id=MODEL,
                kid="k",
                issued_at=past - timedelta(hours=1),
                expires_at=past,
                revoked_at=past - timedelta(minutes=30),
            )
        )
    assert await revocations.refresh() == 0
    assert not revocations.is_revoked("old")
    revocations.revoke_local("gone", expires_at=past)  # honoured until the next refresh
    assert revocations.is_revoked("gone")
    await revocations.refresh()
    assert not revocations.is_revoked("gone")
    assert len(revocations) == 0


async def test_a_refresh_reads_only_what_was_revoked_since_the_last_one(
    approved: Database, signer: TokenSigner, db: Database
) -> None:
    cache = RevocationCache(db, overlap_s=0, full_every_s=3600)
    first, second = [(await _issue(approved, signer, "ns-a"))[1] for _ in range(2)]
    await _revoke(approved, first.jti)
    assert await cache.refresh() == 1
    assert await cache.refresh() == 0
    await _revoke(approved, second.jti)
    assert await cache.refresh() == 1
    assert cache.is_revoked(first.jti) and cache.is_revoked(second.jti)


async def test_a_revocation_stamped_by_a_lagging_clock_is_still_seen(
    approved: Database, signer: TokenSigner, revocations: RevocationCache
) -> None:
    first, late = [(await _issue(approved, signer, "ns-a"))[1] for _ in range(2)]
    await _revoke(approved, first.jti)
    await revocations.refresh()
    # Committed after that refresh, stamped earlier than the newest revocation it read.
    await _revoke(approved, late.jti, at=utcnow() - timedelta(seconds=10))
    await revocations.refresh()
    assert revocations.is_revoked(late.jti)


async def test_another_replica_refuses_a_revoked_key_within_its_refresh_interval(
    approved: Database,
    target: Target,
    signer: TokenSigner,
    verifier: TokenVerifier,
    revocations: RevocationCache,
    secret_key: bytes,
    llm_settings: LlmSettings,
) -> None:
    token, claims = await _issue(approved, signer, "ns-b")
    async with await Database.connect(target.settings) as other_db:
        other_keys = SigningKeys(other_db, secret_key, llm_settings)
        await other_keys.current()
        other_revocations = RevocationCache(other_db)
        await other_revocations.refresh()
        other = TokenVerifier(other_keys, other_revocations, llm_settings)
        assert other.verify(token, "ns-b", MODEL) == claims
        refreshing = asyncio.create_task(other_revocations.run(interval_s=0.5))
        try:
            await _revoke(approved, claims.jti)  # what the admin's revoke_key commits
            revocations.revoke_local(claims.jti)  # this replica: at once
            with pytest.raises(TokenRevokedError):
                verifier.verify(token, "ns-b", MODEL)
            assert await _refused_within(other, token, "ns-b", deadline_s=10)
        finally:
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refreshing


async def _refused_within(verifier: TokenVerifier, token: str, ns: str, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            verifier.verify(token, ns, MODEL)
        except TokenRevokedError:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_age_says_how_stale_the_set_is(db: Database) -> None:
    cache = RevocationCache(db)
    assert cache.age_s() == float("inf")
    with pytest.raises(RevocationsStaleError):  # never read: it vouches for nothing
        cache.check_fresh()
    await cache.refresh()
    assert 0 <= cache.age_s() < 60
    cache.check_fresh()
    assert len(cache) == 0 and not cache.is_revoked(new_id())


def _expired_a_second_ago(keys: SigningKeys, settings: LlmSettings) -> tuple[str, ModelClaims]:
    """A token of ours whose `exp` passed one second ago: inside the verifier's leeway."""
    key, now = keys.signer_now(), int(time.time())
    claims = ModelClaims(
        settings.issuer, settings.audience, "key-1", MODEL, "ns-a", ("llm:chat",),
        now - 60, now - 60, now - 1, new_id(), key.kid,
    )  # fmt: skip
    headers = {"typ": "at+jwt", "kid": key.kid}
    return jwt.encode(claims.payload(), key.private_key, "EdDSA", headers), claims


async def test_a_key_revoked_a_second_before_its_expiry_stays_refused_through_the_leeway(
    approved: Database,
    keys: SigningKeys,
    verifier: TokenVerifier,
    revocations: RevocationCache,
    llm_settings: LlmSettings,
) -> None:
    token, claims = _expired_a_second_ago(keys, llm_settings)
    assert llm_settings.leeway_s > 1 and verifier.verify(token, "ns-a", MODEL) == claims
    row = token_row(claims, "req-ns-a")
    row.revoked_at = claims.expires_at - timedelta(seconds=1)  # revoked 1 s before its exp
    async with approved.admin_session() as session:
        session.add(row)
    revocations.revoke_local(claims.jti, claims.expires_at)  # the replica that revoked
    await revocations.refresh()  # a refresh after `exp` must not forget it
    with pytest.raises(TokenRevokedError):
        verifier.verify(token, "ns-a", MODEL)
    # Another replica, reading the table for the first time, learns it too.
    other = RevocationCache(approved, leeway_s=llm_settings.leeway_s)
    assert await other.refresh() == 1 and other.is_revoked(claims.jti)
    with pytest.raises(TokenRevokedError):
        TokenVerifier(keys, other, llm_settings).verify(token, "ns-a", MODEL)


async def test_the_refresh_loop_outlives_a_broken_table_and_learns_revocations_after(
    approved: Database,
    target: Target,
    keys: SigningKeys,
    signer: TokenSigner,
    llm_settings: LlmSettings,
) -> None:
    """The table disappears under a running loop (not a lost connection: an error the old
    loop died of); keys are refused while the view is stale, and the loop recovers."""
    token, claims = await _issue(approved, signer, "ns-a")
    cache = RevocationCache(approved, max_age_s=1)
    verifier = TokenVerifier(keys, cache, llm_settings)
    refreshing = asyncio.create_task(cache.run(interval_s=0.05))
    try:
        await _until(lambda: cache.age_s() < 1, "a first refresh")
        assert verifier.verify(token, "ns-a", MODEL) == claims
        await target.raw("ALTER TABLE model_access_tokens RENAME TO model_access_tokens_away")
        try:
            await _until(lambda: cache.failures >= 2, "two failed refreshes")
            stale = await _until(lambda: _stale(verifier, token), "a stale view")
            assert stale.retry_after_s >= 1 and "not trusted" in stale.message
            assert cache.last_error and not refreshing.done()
        finally:
            await target.raw("ALTER TABLE model_access_tokens_away RENAME TO model_access_tokens")
        await _revoke(approved, claims.jti)  # committed while this replica knew nothing
        await _until(lambda: cache.is_revoked(claims.jti), "the revocation after recovery")
        assert cache.failures == 0 and cache.last_error is None
        with pytest.raises(TokenRevokedError):
            verifier.verify(token, "ns-a", MODEL)
    finally:
        refreshing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refreshing


def _stale(verifier: TokenVerifier, token: str) -> RevocationsStaleError | None:
    try:
        verifier.verify(token, "ns-a", MODEL)
    except RevocationsStaleError as error:
        return error
    return None


async def _until(check: Callable[[], T | None], what: str, deadline_s: float = 30) -> T:
    deadline = time.monotonic() + deadline_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not reached within {deadline_s} s"
        await asyncio.sleep(0.02)
    return value
