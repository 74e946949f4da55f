"""KeyService: create, list (masked), revoke, rotate (with an outbox event), authenticate keys.

A namespace key acts on another key only when it holds every scope of that key; whatever a key
hands out (a new key, a successor) expires no later than the key itself; revoking a key revokes
its successors; the last active admin key is never revoked. A key bound to a sandbox (its own
key) acts on that sandbox only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cave.audit.event import SYSTEM_ACTOR, AuditEvent
from cave.audit.trail import AuditTrail
from cave.auth import api_keys
from cave.auth.principal import ForbiddenError, Principal
from cave.auth.settings import AuthSettings
from cave.db import ApiKeyRow, Database, KeyRotationEventRow, OutboxRow, new_id, utcnow
from cave.errors import AuthError, ConflictError, InvalidArgumentError, NotFoundError

KINDS = ("admin", "namespace")
SCOPES = frozenset(
    {"sandboxes:read", "sandboxes:write", "keys:read", "keys:write", "llm:request", "audit:read"}
)
ROTATED_TOPIC = "key.rotated"
MAX_TTL_S = 10 * 365 * 86400.0  # past this a datetime overflows long before the key matters
MAX_GRACE_S = 30 * 86400.0
CACHE_TTL_S = 5.0  # how long another process's revocation may take to reach this one
__all__ = ["ForbiddenError", "KeyInfo", "KeyService", "Principal"]  # Principal: principal.py


@dataclass(frozen=True)
class KeyInfo:
    """A key as lists show it: never its secret."""

    id: str
    masked: str
    kind: str
    namespace_id: str | None
    scopes: tuple[str, ...]
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    grace_until: datetime | None
    last_used_at: datetime | None
    rotated_from_id: str | None
    sandbox_id: str | None = None

    @classmethod
    def of(cls, row: ApiKeyRow) -> KeyInfo:
        return cls(
            row.id,
            api_keys.mask(row.id),
            row.kind,
            row.namespace_id,
            tuple(row.scopes),
            row.name,
            row.created_at,
            row.expires_at,
            row.revoked_at,
            row.grace_until,
            row.last_used_at,
            row.rotated_from_id,
            row.sandbox_id,
        )


@dataclass
class _Cached:
    secret_hash: str
    principal: Principal
    not_after: datetime | None  # expiry or end of rotation grace, whichever is first
    loaded: float


@dataclass
class KeyService:
    db: Database
    settings: AuthSettings
    audit: AuditTrail | None = None
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _used: dict[str, datetime] = field(default_factory=dict)

    async def create(
        self,
        kind: str,
        namespace_id: str | None,
        scopes: list[str],
        name: str = "",
        ttl_s: float | None = None,
        actor: str = SYSTEM_ACTOR,
        not_after: datetime | None = None,
    ) -> tuple[KeyInfo, str]:
        """A new key and its plaintext, which is shown this once and never stored. `not_after`
        (the creating key's expiry) caps its expiry, and is its expiry when no ttl_s is asked."""
        async with self.db.admin_session() as session:
            row, plaintext = self.add_key(
                session, kind, namespace_id, scopes, name, ttl_s, not_after=not_after
            )
        await self.record_created(row, actor)
        return KeyInfo.of(row), plaintext

    def add_key(
        self,
        session: AsyncSession,
        kind: str,
        namespace_id: str | None,
        scopes: list[str],
        name: str = "",
        ttl_s: float | None = None,
        sandbox_id: str | None = None,
        not_after: datetime | None = None,
    ) -> tuple[ApiKeyRow, str]:
        """Add a new key to the caller's transaction (which commits it); then `record_created`."""
        _check_new_key(kind, namespace_id, scopes, ttl_s)
        row, plaintext = self._new_row(kind, namespace_id, scopes, name, _expiry(ttl_s, not_after))
        row.sandbox_id = sandbox_id
        session.add(row)
        return row, plaintext

    async def record_created(self, row: ApiKeyRow, actor: str = SYSTEM_ACTOR) -> None:
        if self.audit is not None:
            await self.audit.record(self.created_event(row, actor))

    @staticmethod
    def created_event(row: ApiKeyRow, actor: str = SYSTEM_ACTOR) -> AuditEvent:
        """What `record_created` records, for a caller that records it with its own events."""
        details: dict[str, object] = {"kind": row.kind, "scopes": row.scopes}
        return AuditEvent(actor, "key.create", row.id, namespace=row.namespace_id, details=details)

    def _new_row(
        self,
        kind: str,
        namespace_id: str | None,
        scopes: list[str],
        name: str,
        expires: datetime | None,
    ) -> tuple[ApiKeyRow, str]:
        issued = api_keys.new_key(self.settings.key_pepper)
        row = ApiKeyRow(
            id=issued.key_id,
            kind=kind,
            namespace_id=namespace_id,
            prefix=f"{api_keys.PREFIX}{issued.key_id}",
            secret_hash=issued.secret_hash,
            scopes=sorted(set(scopes)),
            name=name,
            expires_at=expires,
        )
        return row, issued.plaintext

    async def list(self, namespace_id: str | None = None) -> list[KeyInfo]:
        """Keys of one namespace, or all keys (admin) when namespace_id is None."""
        async with self.db.scoped_session(namespace_id) as session:
            rows = (await session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))).all()
        return [KeyInfo.of(row) for row in rows]

    async def revoke(
        self,
        key_id: str,
        namespace_id: str | None = None,
        actor: str = SYSTEM_ACTOR,
        by: Principal | None = None,
    ) -> KeyInfo:
        """Revoke the key and every key rotated from it, transitively (a successor must not
        outlive a revocation). `by`: the caller, who must hold every scope of the key. The
        last active admin key is kept (ConflictError)."""
        now = utcnow()
        async with self.db.scoped_session(namespace_id) as session:
            row = await _get(session, key_id)
            if by is not None:
                by.may_act_on(row.id, row.scopes)
            chain = await _successors(session, key_id)
            if row.kind == "admin":
                await _keep_an_admin(session, chain, now)
            if row.revoked_at is None:
                row.revoked_at = now
            await session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id.in_(chain[1:]), ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=now)
                .execution_options(synchronize_session=False)
            )
        for revoked in chain:  # at once in this process, within CACHE_TTL_S elsewhere
            self._cache.pop(revoked, None)
        await self._record(actor, "key.revoke", row, {"successors": chain[1:]})
        return KeyInfo.of(row)

    async def revoke_sandbox_keys(
        self, sandbox_id: str, actor: str = SYSTEM_ACTOR
    ) -> tuple[str, ...]:
        """Revoke the keys bound to a sandbox (it stopped, expired, was lost or deleted)."""
        async with self.db.admin_session() as session:
            rows = (
                await session.scalars(
                    select(ApiKeyRow).where(
                        ApiKeyRow.sandbox_id == sandbox_id, ApiKeyRow.revoked_at.is_(None)
                    )
                )
            ).all()
            for row in rows:
                row.revoked_at = utcnow()
        for row in rows:
            self._cache.pop(row.id, None)
            await self._record(actor, "key.revoke", row, {"sandbox_id": sandbox_id})
        return tuple(row.id for row in rows)

    async def rotate(
        self,
        key_id: str,
        namespace_id: str | None = None,
        grace_s: float | None = None,
        actor: str = SYSTEM_ACTOR,
        by: Principal | None = None,
    ) -> tuple[KeyInfo, str]:
        """A successor key; the old one works for the grace period. One transaction writes the
        new key, the old key's grace, the rotation event and its outbox message; of two
        concurrent rotations of one key exactly one wins, the other gets a ConflictError.
        `by`: the caller, who must hold every scope of the key; the successor keeps the key's
        scopes, sandbox and expiry, capped at the caller's expiry."""
        grace = self.settings.rotation_grace_s if grace_s is None else grace_s
        if not 0 <= grace <= MAX_GRACE_S:
            raise InvalidArgumentError(
                f"grace_s must be >= 0 and at most {MAX_GRACE_S:.0f}, got {grace}"
            )
        async with self.db.scoped_session(namespace_id) as session:
            old = await _get(session, key_id)
            if by is not None:
                by.may_act_on(old.id, old.scopes)
            until = utcnow() + timedelta(seconds=grace)
            claimed = await session.execute(
                update(ApiKeyRow)
                .where(
                    ApiKeyRow.id == key_id,
                    ApiKeyRow.grace_until.is_(None),
                    ApiKeyRow.revoked_at.is_(None),
                )
                .values(grace_until=until)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(f"key {key_id} is already rotated or revoked")
            cap = by.expires_at if by is not None else None
            row, plaintext = self._new_row(
                old.kind,
                old.namespace_id,
                list(old.scopes),
                old.name,
                _earliest(old.expires_at, cap),
            )
            row.rotated_from_id = key_id
            row.sandbox_id = old.sandbox_id
            session.add(row)
            await session.flush()
            session.add(
                KeyRotationEventRow(
                    key_id=key_id,
                    new_key_id=row.id,
                    namespace_id=old.namespace_id,
                    grace_until=until,
                )
            )
            session.add(_rotation_message(key_id, row.id, old.namespace_id, until))
        self._cache.pop(key_id, None)
        await self._record(
            actor, "key.rotate", old, {"new_key_id": row.id, "grace_until": until.isoformat()}
        )
        return KeyInfo.of(row), plaintext

    async def _record(
        self, actor: str, action: str, row: ApiKeyRow, details: dict[str, object]
    ) -> None:
        if self.audit is not None:
            await self.audit.record(
                AuditEvent(actor, action, row.id, namespace=row.namespace_id, details=details)
            )

    async def authenticate(self, plaintext: str) -> Principal:
        """The principal of a valid key; AuthError with one vague message for every failure."""
        key_id, secret = api_keys.parse(plaintext)
        cached = self._cache.get(key_id)
        if cached is None or time.monotonic() - cached.loaded > CACHE_TTL_S:
            cached = await self._load(key_id)
        if not api_keys.secret_matches(secret, cached.secret_hash, self.settings.key_pepper):
            raise AuthError("invalid API key")
        now = utcnow()
        if cached.not_after is not None and now >= cached.not_after:
            raise AuthError("invalid API key")
        self._used[key_id] = now  # written in batches by flush_last_used, not per request
        return cached.principal

    async def _load(self, key_id: str) -> _Cached:
        async with self.db.read_session(None) as session:
            row = await session.get(ApiKeyRow, key_id)
        if row is None or row.revoked_at is not None:
            self._cache.pop(key_id, None)
            raise AuthError("invalid API key")
        ends = [t for t in (row.expires_at, row.grace_until) if t is not None]
        principal = Principal(
            row.id,
            row.kind,
            row.namespace_id,
            frozenset(row.scopes),
            row.sandbox_id,
            row.expires_at,
        )
        cached = _Cached(row.secret_hash, principal, min(ends) if ends else None, time.monotonic())
        self._cache[key_id] = cached
        return cached

    def forget(self, key_id: str) -> None:
        """Drop the key from this process's cache: its next use reads the database (a rotation
        or revocation announced by webhook takes effect at once)."""
        self._cache.pop(key_id, None)

    async def flush_last_used(self) -> int:
        """Write the last-use times gathered since the previous flush; returns how many."""
        used, self._used = self._used, {}
        if not used:
            return 0
        async with self.db.admin_session() as session:
            for key_id, when in used.items():
                await session.execute(
                    update(ApiKeyRow)
                    .where(ApiKeyRow.id == key_id)
                    .values(last_used_at=when)
                    .execution_options(synchronize_session=False)
                )
        return len(used)


async def _get(session: AsyncSession, key_id: str) -> ApiKeyRow:
    row = (await session.scalars(select(ApiKeyRow).where(ApiKeyRow.id == key_id))).first()
    if row is None:
        raise NotFoundError(f"no API key {key_id!r}")
    return row


async def _successors(session: AsyncSession, key_id: str) -> list[str]:
    """The key and the keys rotated from it, transitively, oldest first."""
    chain, frontier = [key_id], [key_id]
    while frontier:
        query = select(ApiKeyRow.id).where(ApiKeyRow.rotated_from_id.in_(frontier))
        frontier = [i for i in (await session.scalars(query)).all() if i not in chain]
        chain += frontier
    return chain


async def _keep_an_admin(session: AsyncSession, leaving: list[str], now: datetime) -> None:
    """ConflictError when revoking `leaving` would leave no active admin key. FOR UPDATE (on
    PostgreSQL; SQLite serialises writers): of two revocations of the last two admin keys, the
    second sees the first's and is refused."""
    query = (
        select(ApiKeyRow.id)
        .where(
            ApiKeyRow.kind == "admin",
            ApiKeyRow.revoked_at.is_(None),
            ApiKeyRow.grace_until.is_(None),
            or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > now),
        )
        .with_for_update()
    )
    active = set((await session.scalars(query)).all())
    if active and active <= set(leaving):
        raise ConflictError(
            f"key {leaving[0]} is the last active admin key: create another admin key first"
        )


def _expiry(ttl_s: float | None, not_after: datetime | None) -> datetime | None:
    asked = utcnow() + timedelta(seconds=ttl_s) if ttl_s else None
    return _earliest(asked, not_after)


def _earliest(*times: datetime | None) -> datetime | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _check_new_key(
    kind: str, namespace_id: str | None, scopes: list[str], ttl_s: float | None
) -> None:
    if kind not in KINDS:
        raise InvalidArgumentError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind == "namespace") != (namespace_id is not None):
        raise InvalidArgumentError("a namespace key needs a namespace; an admin key has none")
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise InvalidArgumentError(f"unknown scopes {unknown}; known: {sorted(SCOPES)}")
    if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
        raise InvalidArgumentError(f"ttl_s must be > 0 and at most {MAX_TTL_S:.0f}, got {ttl_s}")


def _rotation_message(
    key_id: str, new_key_id: str, namespace_id: str | None, until: datetime
) -> OutboxRow:
    event_id = new_id()
    return OutboxRow(
        event_id=event_id,
        topic=ROTATED_TOPIC,
        payload={
            "event_id": event_id,
            "type": ROTATED_TOPIC,
            "key_id": key_id,
            "new_key_id": new_key_id,
            "namespace_id": namespace_id,
            "grace_until": until.isoformat(),
        },
    )
