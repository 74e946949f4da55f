"""API keys on SQLite and PostgreSQL: issue, authenticate, scope, revoke, rotate, race."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from sqlalchemy import select

from cave.auth import api_keys
from cave.auth.keys import ForbiddenError, KeyInfo, KeyService, Principal
from cave.auth.settings import AuthSettings
from cave.db import ApiKeyRow, Database, KeyRotationEventRow, NamespaceRow, OutboxRow
from cave.errors import AuthError, ConflictError, InvalidArgumentError, NotFoundError

pytestmark = pytest.mark.anyio


@pytest.fixture
async def keys(db: Database, auth_settings: AuthSettings) -> KeyService:
    async with db.admin_session() as session:
        session.add_all([NamespaceRow(id="ns-a", name="a"), NamespaceRow(id="ns-b", name="b")])
    return KeyService(db, auth_settings)


async def test_a_key_authenticates_with_its_scopes_and_only_its_hash_is_stored(
    keys: KeyService, db: Database
) -> None:
    info, plaintext = await keys.create("namespace", "ns-a", ["sandboxes:read"], name="ci")
    principal = await keys.authenticate(plaintext)
    assert (principal.namespace_id, principal.kind) == ("ns-a", "namespace")
    principal.require("sandboxes:read")
    with pytest.raises(ForbiddenError):
        principal.require("sandboxes:write")
    async with db.admin_session() as session:
        row = await session.get(ApiKeyRow, info.id)
    # The whole secret, as the key format parses it: it may itself hold "_", so a split on "_"
    # could leave a two-letter tail that a hex hash contains by chance.
    secret = api_keys.parse(plaintext)[1]
    assert row is not None and secret not in row.secret_hash
    assert info.masked.endswith("_****") and plaintext not in repr(info)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),
        lambda k: k.replace("cave_live_", "cave_test_"),
        lambda k: "",
        lambda k: k + "x",
    ],
    ids=["wrong-secret", "wrong-prefix", "empty", "too-long"],
)
async def test_a_wrong_key_is_refused_without_detail(keys: KeyService, mangle) -> None:  # type: ignore[no-untyped-def]
    _, plaintext = await keys.create("admin", None, [])
    with pytest.raises(AuthError) as caught:
        await keys.authenticate(mangle(plaintext))
    assert str(caught.value) in ("invalid API key", "malformed API key")


async def test_an_unknown_key_id_is_refused(keys: KeyService) -> None:
    _, plaintext = await keys.create("admin", None, [])
    other = plaintext.replace(plaintext[10:22], "abcdefghijkl")
    with pytest.raises(AuthError, match="invalid API key"):
        await keys.authenticate(other)


async def test_revocation_takes_effect_at_once(keys: KeyService) -> None:
    info, plaintext = await keys.create("namespace", "ns-a", ["sandboxes:read"])
    await keys.authenticate(plaintext)  # now cached
    await keys.revoke(info.id)
    with pytest.raises(AuthError):
        await keys.authenticate(plaintext)


async def test_an_expired_key_is_refused(keys: KeyService, db: Database) -> None:
    info, plaintext = await keys.create("namespace", "ns-a", [], ttl_s=3600)
    async with db.admin_session() as session:
        row = await session.get(ApiKeyRow, info.id)
        assert row is not None
        row.expires_at = row.created_at
    with pytest.raises(AuthError):
        await keys.authenticate(plaintext)


async def test_namespace_listing_is_masked_and_scoped(keys: KeyService) -> None:
    await keys.create("namespace", "ns-a", ["sandboxes:read"])
    await keys.create("namespace", "ns-b", ["sandboxes:read"])
    await keys.create("admin", None, [])
    listed = await keys.list("ns-a")
    assert [k.namespace_id for k in listed] == ["ns-a"]
    assert len(await keys.list()) == 3
    with pytest.raises(NotFoundError):  # another namespace's key does not exist for ns-b
        await keys.revoke(listed[0].id, namespace_id="ns-b")


@pytest.mark.parametrize(
    ("kind", "namespace", "scopes", "ttl"),
    [
        ("root", None, [], None),
        ("namespace", None, [], None),
        ("admin", "ns-a", [], None),
        ("namespace", "ns-a", ["everything"], None),
        ("namespace", "ns-a", [], -1),
    ],
)
async def test_bad_key_requests_are_invalid(
    keys: KeyService, kind: str, namespace: str | None, scopes: list[str], ttl: float | None
) -> None:
    with pytest.raises(InvalidArgumentError):
        await keys.create(kind, namespace, scopes, ttl_s=ttl)


async def test_rotation_keeps_the_old_key_for_the_grace_and_writes_one_outbox_event(
    keys: KeyService, db: Database
) -> None:
    old, old_plain = await keys.create("namespace", "ns-a", ["sandboxes:write"])
    new, new_plain = await keys.rotate(old.id)
    assert new.rotated_from_id == old.id and new.scopes == old.scopes
    assert (await keys.authenticate(old_plain)).key_id == old.id  # still inside the grace
    assert (await keys.authenticate(new_plain)).key_id == new.id
    async with db.admin_session() as session:
        events = (await session.scalars(select(KeyRotationEventRow))).all()
    async with db.admin_session() as session:  # the outbox is the system's, not a namespace's
        outbox = (await session.scalars(select(OutboxRow))).all()
    assert [(e.key_id, e.new_key_id) for e in events] == [(old.id, new.id)]
    assert [(o.topic, o.payload["key_id"]) for o in outbox] == [("key.rotated", old.id)]


async def test_after_the_grace_the_old_key_stops_working(
    db: Database, auth_settings: AuthSettings
) -> None:
    keys = KeyService(db, auth_settings.model_copy(update={"rotation_grace_s": 0}))
    old, old_plain = await keys.create("admin", None, [])
    await keys.rotate(old.id)
    with pytest.raises(AuthError):
        await keys.authenticate(old_plain)


async def test_concurrent_rotations_of_one_key_one_wins_and_no_key_is_lost(
    keys: KeyService, db: Database
) -> None:
    old, _ = await keys.create("namespace", "ns-a", ["sandboxes:read"])
    results = await asyncio.gather(*(keys.rotate(old.id) for _ in range(4)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, ConflictError) for r in losers)
    async with db.admin_session() as session:
        rows = (await session.scalars(select(ApiKeyRow))).all()
    async with db.admin_session() as session:  # the outbox is the system's, not a namespace's
        outbox = (await session.scalars(select(OutboxRow))).all()
    assert sorted(r.id for r in rows) == sorted([old.id, winners[0][0].id])
    assert len(outbox) == 1


async def test_last_use_is_recorded_in_batches(keys: KeyService, db: Database) -> None:
    info, plaintext = await keys.create("admin", None, [])
    for _ in range(5):
        await keys.authenticate(plaintext)
    async with db.admin_session() as session:
        assert (await session.get(ApiKeyRow, info.id)).last_used_at is None  # type: ignore[union-attr]
    assert await keys.flush_last_used() == 1
    assert (await keys.list())[0].last_used_at is not None


async def test_a_namespace_rotates_its_own_key_but_not_another_namespaces(
    keys: KeyService, db: Database
) -> None:
    own, _ = await keys.create("namespace", "ns-a", ["keys:write"])
    other, _ = await keys.create("namespace", "ns-b", ["keys:write"])
    new, _ = await keys.rotate(own.id, namespace_id="ns-a")
    assert new.namespace_id == "ns-a"
    with pytest.raises(NotFoundError):
        await keys.rotate(other.id, namespace_id="ns-a")
    async with db.admin_session() as session:
        outbox = (await session.scalars(select(OutboxRow))).all()
    assert [o.payload["key_id"] for o in outbox] == [own.id]


def _principal(info: KeyInfo) -> Principal:
    return Principal(info.id, info.kind, info.namespace_id, frozenset(info.scopes))


async def _state(db: Database, key_id: str) -> tuple[object, object]:
    async with db.admin_session() as session:
        row = await session.get(ApiKeyRow, key_id)
    assert row is not None
    return row.revoked_at, row.grace_until


async def test_a_key_acts_only_on_keys_whose_every_scope_it_holds(
    keys: KeyService, db: Database
) -> None:
    attacker, _ = await keys.create("namespace", "ns-a", ["keys:write"])
    victim, victim_plain = await keys.create("namespace", "ns-a", ["sandboxes:write"])
    by = _principal(attacker)
    with pytest.raises(ForbiddenError, match="sandboxes:write"):
        await keys.rotate(victim.id, "ns-a", by=by)
    with pytest.raises(ForbiddenError, match="sandboxes:write"):
        await keys.revoke(victim.id, "ns-a", by=by)
    assert await _state(db, victim.id) == (None, None)  # neither revoked nor in a grace
    assert (await keys.authenticate(victim_plain)).key_id == victim.id
    async with db.admin_session() as session:
        assert (await session.scalars(select(OutboxRow))).all() == []  # no rotation announced
    # Itself, and a key whose scopes it holds, it may rotate and revoke.
    own, _ = await keys.rotate(attacker.id, "ns-a", by=by)
    holder, _ = await keys.create("namespace", "ns-a", ["keys:write", "sandboxes:write"])
    successor, _ = await keys.rotate(victim.id, "ns-a", by=_principal(holder))
    await keys.revoke(successor.id, "ns-a", by=_principal(holder))
    assert own.scopes == ("keys:write",)


async def test_what_a_key_hands_out_expires_no_later_than_it(keys: KeyService) -> None:
    parent, _ = await keys.create("namespace", "ns-a", ["keys:write"], ttl_s=3600)
    assert parent.expires_at is not None
    limit = parent.expires_at
    unasked, _ = await keys.create("namespace", "ns-a", [], not_after=limit)
    longer, _ = await keys.create("namespace", "ns-a", [], ttl_s=7200, not_after=limit)
    shorter, _ = await keys.create("namespace", "ns-a", [], ttl_s=60, not_after=limit)
    assert unasked.expires_at == longer.expires_at == limit
    assert shorter.expires_at is not None and shorter.expires_at < limit
    forever, _ = await keys.create("namespace", "ns-a", [], not_after=None)
    assert forever.expires_at is None  # a key without expiry hands out keys without one
    # A successor made by a shorter-lived key lives no longer than that key either.
    by = replace(_principal(parent), expires_at=limit)
    rotated, _ = await keys.rotate(forever.id, "ns-a", by=by)
    assert rotated.expires_at == limit


async def test_revoking_a_key_revokes_every_key_rotated_from_it(
    keys: KeyService, db: Database
) -> None:
    first, first_plain = await keys.create("namespace", "ns-a", ["sandboxes:read"])
    second, second_plain = await keys.rotate(first.id)
    third, third_plain = await keys.rotate(second.id)
    unrelated, unrelated_plain = await keys.create("namespace", "ns-a", ["sandboxes:read"])
    for plain in (first_plain, second_plain, third_plain):
        await keys.authenticate(plain)  # cached now: the revocation must drop every entry
    await keys.revoke(first.id, "ns-a")
    for plain in (first_plain, second_plain, third_plain):
        with pytest.raises(AuthError):
            await keys.authenticate(plain)
    assert (await keys.authenticate(unrelated_plain)).key_id == unrelated.id
    revoked = {k.id for k in await keys.list("ns-a") if k.revoked_at is not None}
    assert revoked == {first.id, second.id, third.id}


async def test_the_last_active_admin_key_is_kept(keys: KeyService, db: Database) -> None:
    first, first_plain = await keys.create("admin", None, [])
    with pytest.raises(ConflictError, match="last active admin key"):
        await keys.revoke(first.id)
    second, _ = await keys.create("admin", None, [])
    await keys.revoke(first.id)
    with pytest.raises(ConflictError):
        await keys.revoke(second.id)
    # A rotation does not help: revoking the key revokes its successor, the last admin.
    successor, successor_plain = await keys.rotate(second.id)
    with pytest.raises(ConflictError):
        await keys.revoke(second.id)
    with pytest.raises(ConflictError):
        await keys.revoke(successor.id)
    assert (await keys.authenticate(successor_plain)).is_admin
    assert await _state(db, successor.id) == (None, None)


async def test_two_revocations_of_the_last_two_admin_keys_leave_one(
    keys: KeyService, db: Database
) -> None:
    pair = [(await keys.create("admin", None, []))[0] for _ in range(2)]
    results = await asyncio.gather(*(keys.revoke(k.id) for k in pair), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["ConflictError", "KeyInfo"]
    active = [k for k in await keys.list() if k.kind == "admin" and k.revoked_at is None]
    assert len(active) == 1
