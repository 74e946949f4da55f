"""The revocation set on SQLite and PostgreSQL: what a refresh reads, keeps, drops, and when."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timedelta

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
from cave.errors import TokenRevokedError
from inference.llm_settings import LlmSettings
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import ModelClaims, TokenSigner, TokenVerifier, token_row
from tests.db.conftest import Target

pytestmark = pytest.mark.anyio

MODEL = "tiny-chat"
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


async def test_age_says_how_stale_the_set_is(revocations: RevocationCache) -> None:
    assert revocations.age_s() == float("inf")
    await revocations.refresh()
    assert 0 <= revocations.age_s() < 60
    assert len(revocations) == 0 and not revocations.is_revoked(new_id())
