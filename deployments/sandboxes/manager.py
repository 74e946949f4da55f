"""SandboxManager: the sandbox lifecycle behind every front end (HTTP, MCP, Ray handles).

Each step checks the caller's scope, keeps the database record and the actor in step, and writes
an audit event. A namespace key sees only its namespace: another namespace's sandbox is "not found".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from actors import remote
from actors.placement import DEFAULT_POOL, POOL_LABEL
from cave.audit.event import AuditEvent, Outcome
from cave.audit.trail import AuditTrail
from cave.auth import api_keys
from cave.auth.keys import ForbiddenError, KeyService, Principal
from cave.auth.sandbox_keys import add_sandbox_key, renew_sandbox_key
from cave.db import Database, NamespaceRow, SandboxRow, new_id, utcnow
from cave.errors import (
    CaveError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    SandboxNotFoundError,
    SandboxStateError,
)
from config.settings import SandboxLimits, Settings, resolve_limits
from deployments.sandboxes import quotas
from deployments.sandboxes.exec_records import ExecRecorder
from deployments.sandboxes.ops import Live, SandboxOps
from deployments.sandboxes.views import decode_cursor, encode_cursor, sandbox_out
from deployments.schemas import (
    CreatedSandboxOut,
    CreateSandboxRequest,
    ExecEvent,
    ExecOut,
    ExecRequest,
    NamespaceOut,
    NamespaceQuotas,
    NamespaceSettings,
    SandboxOut,
    SandboxPage,
)
from deployments.spans import span

DEFAULT_NAMESPACE = "default"
MAX_PAGE = 200
_MOVING = ("starting", "stopping")
SETTLE_WAIT_S = 30.0  # a start or stop takes seconds; the reconciler clears a stuck one later
SETTLE_POLL_S = 0.05
_AT_REST = ("created", "stopped", "failed", "lost")  # no actor, nothing in flight
_STARTABLE = _DELETABLE = _AT_REST


class SandboxManager(SandboxOps):
    def __init__(
        self,
        settings: Settings,
        db: Database,
        keys: KeyService,
        audit: AuditTrail,
        recorder: ExecRecorder | None = None,
    ) -> None:
        super().__init__(db, audit, recorder or ExecRecorder(audit))
        self.settings = settings
        self.keys = keys
        self._namespaces: set[str] = set()  # known to exist: no insert-if-missing per create
        self.exec_quota = quotas.ExecQuota(db, settings.quotas)

    # -- create, start, stop, delete ---------------------------------------------------------

    async def create(
        self, principal: Principal, request: CreateSandboxRequest
    ) -> CreatedSandboxOut:
        principal.require("sandboxes:write")
        namespace = self._target_namespace(principal, request.namespace)
        limits = resolve_limits(request.limits, self.settings)  # refused before anything is written
        if request.wait_s > self.settings.placement.max_wait_s:
            raise InvalidArgumentError(
                f"wait_s={request.wait_s:g} is above this server's most, "
                f"{self.settings.placement.max_wait_s:g} s (placement.max_wait_s)"
            )
        await self.ensure_namespace(namespace)
        pool = await self._pool(principal, namespace, request.labels)
        if pool != DEFAULT_POOL:  # a restart places it in the same pool
            request = request.model_copy(update={"labels": {**request.labels, POOL_LABEL: pool}})
        sandbox_id = new_id()
        node = None
        if request.start:  # a full cluster refuses before anything is written
            node = await remote.reserve(
                sandbox_id, self.settings, pool, request.wait_s, limits.memory_bytes
            )
        try:
            row, plaintext, keyed = await self._insert(
                principal, namespace, request, limits, sandbox_id
            )
        except BaseException:
            if node is not None:
                await remote.release(sandbox_id)
            raise
        # Recorded in one transaction with the start's (one commit, not three).
        created = [keyed, self._event(principal, "sandbox.create", row, {"name": row.name})]
        if request.start:  # inserted as `starting`: the start's own claim is not needed
            row = await self._start(principal, row, node, claimed=True, before=created)
        else:
            await self.audit.record_many(created)
        return CreatedSandboxOut(**sandbox_out(row).model_dump(), api_key=plaintext)

    async def _pool(self, principal: Principal, namespace: str, labels: dict[str, str]) -> str:
        """The node pool of a new sandbox: its `cave.pool` label, else its namespace's pool.
        A restricted pool takes an admin key's sandboxes, and those of the namespaces an admin
        assigned to it."""
        assigned = await self.namespace_pool(namespace)
        pool = labels.get(POOL_LABEL) or assigned or DEFAULT_POOL
        restricted = pool in self.settings.placement.restricted_pools
        if restricted and not principal.is_admin and pool != assigned:
            raise ForbiddenError(
                f"pool {pool!r} takes sandboxes of admin keys and of namespaces an admin "
                f"assigned to it; namespace {namespace!r} is not"
            )
        return pool

    # -- namespaces --------------------------------------------------------------------------

    async def namespace_pool(self, namespace: str) -> str | None:
        async with self.db.read_session(None) as session:
            row = await session.get(NamespaceRow, namespace)
        return row.pool if row is not None else None

    async def set_namespace_pool(
        self, principal: Principal, namespace: str, pool: str | None
    ) -> NamespaceRow:
        """Assign `namespace` (created if new) to a node pool; None: back to the default."""
        if not principal.is_admin:
            raise ForbiddenError("only an admin key may assign a namespace to a node pool")
        await self.ensure_namespace(namespace)
        async with self.db.admin_session() as session:
            row = await session.get(NamespaceRow, namespace)
            if row is None:
                raise ConflictError(f"namespace {namespace!r} was removed meanwhile")
            before, row.pool = row.pool, pool
        details = {"pool": pool, "before": before}
        await self.audit.record(
            principal.audit_event("namespace.pool", namespace, namespace, details)
        )
        return row

    async def update_namespace(
        self, principal: Principal, namespace: str, body: NamespaceSettings
    ) -> NamespaceOut:
        """Change what the body names (pool, quotas); what it leaves out stays as it is."""
        if not principal.is_admin:
            raise ForbiddenError("only an admin key may change a namespace")
        if "pool" in body.model_fields_set:
            await self.set_namespace_pool(principal, namespace, body.pool)
        await self.ensure_namespace(namespace)
        if "quotas" in body.model_fields_set:
            await self._set_quotas(principal, namespace, body.quotas or NamespaceQuotas())
        return await self.namespace(principal, namespace)

    async def _set_quotas(
        self, principal: Principal, namespace: str, wanted: NamespaceQuotas
    ) -> None:
        async with self.db.admin_session() as session:
            row = await quotas.lock_namespace(session, namespace)
            if row is None:
                raise ConflictError(f"namespace {namespace!r} was removed meanwhile")
            before = quotas.overrides_of(row).model_dump()
            quotas.set_overrides(row, wanted)
        self.exec_quota.forget(namespace)
        details = {"quotas": wanted.model_dump(), "before": before}
        event = principal.audit_event("namespace.quotas", namespace, namespace, details)
        await self.audit.record(event)

    async def namespace(self, principal: Principal, namespace: str) -> NamespaceOut:
        """The namespace's pool and quotas, and what its live sandboxes hold now."""
        if not principal.is_admin:
            raise ForbiddenError("only an admin key may read a namespace's settings")
        async with self.db.read_session(None) as session:
            row = await session.get(NamespaceRow, namespace)
            if row is None:
                raise NotFoundError(f"no namespace {namespace!r}")
            used = await quotas.usage(session, namespace)
        return quotas.namespace_out(row, self.settings.quotas, used)

    async def namespaces(self, principal: Principal) -> list[NamespaceRow]:
        if not principal.is_admin:
            raise ForbiddenError("only an admin key may list namespaces")
        async with self.db.read_session(None) as session:
            query = select(NamespaceRow).order_by(NamespaceRow.name)
            return list((await session.scalars(query)).all())

    async def _insert(
        self,
        principal: Principal,
        namespace: str,
        request: CreateSandboxRequest,
        limits: SandboxLimits,
        sandbox_id: str,
    ) -> tuple[SandboxRow, str, AuditEvent]:
        """The record and the sandbox's own key, sealed onto it: one transaction, both or none;
        the key's audit event, for the caller to record with its own."""
        defaults = self.settings.quotas
        async with self.db.namespace_session(namespace) as session:
            await quotas.admit(session, namespace, limits, defaults)  # refused: nothing written
            row = SandboxRow(
                id=sandbox_id,
                namespace_id=namespace,
                name=request.name,
                state="starting" if request.start else "created",
                limits=limits.model_dump(),
                labels=dict(request.labels),
                ttl_s=request.ttl_s or defaults.default_ttl_s or None,
                idle_timeout_s=request.idle_timeout_s or defaults.default_idle_timeout_s or None,
            )
            key, plaintext = add_sandbox_key(self.keys, session, row, principal.expires_at)
            session.add(row)
        return row, plaintext, self.keys.created_event(key, principal.key_id)

    async def start(self, principal: Principal, sandbox_id: str) -> CreatedSandboxOut:
        """Start it; a sandbox whose stop revoked its key gets a new one, shown in `api_key`."""
        principal.require("sandboxes:write")
        row = await self._load(principal, sandbox_id)
        if row.state in ("running", "starting"):
            return CreatedSandboxOut(**sandbox_out(row).model_dump())  # twice is not an error
        if row.state not in _STARTABLE:
            raise_state(row, "start")
        out = sandbox_out(row := await self._start(principal, row))
        key = None
        if row.state == "running":  # this request started it (not a concurrent one)
            key = await renew_sandbox_key(
                self.keys, row.id, row.namespace_id, principal.key_id, principal.expires_at
            )
        masked = api_keys.mask(key) if key else out.api_key_masked
        return CreatedSandboxOut(**{**out.model_dump(), "api_key_masked": masked}, api_key=key)

    async def _start(
        self,
        principal: Principal,
        row: SandboxRow,
        node: str | None = None,
        claimed: bool = False,
        before: Sequence[AuditEvent] = (),
    ) -> SandboxRow:
        """Start it on `node`, reserved for it, or on a node reserved now (CapacityError when
        every node of its pool is full, with the record as it was). `claimed`: the record is
        `starting` already (a create inserted it so); `before`: audit events recorded with the
        start's own, in one transaction."""
        limits = SandboxLimits.model_validate(row.limits)
        if node is None:
            pool = row.labels.get(POOL_LABEL, DEFAULT_POOL)
            node = await remote.reserve(row.id, self.settings, pool, 0.0, limits.memory_bytes)
        if not claimed:
            try:
                claimed = await self._claim_start(row, limits)
            except BaseException:
                await remote.release(row.id)
                raise
        if not claimed:
            await remote.release(row.id)
            return await self._load(principal, row.id)  # another request is starting it
        try:
            with span("sandbox.start", sandbox_id=row.id, node_id=node):
                actor, info = await remote.create(
                    row.id, limits, self.settings, node, reserved=True
                )
        except CaveError as exc:
            failed = self._event(principal, "sandbox.start", row, {"error": exc.code}, "error")
            change = _Setter(row.id, state="failed", failure=str(exc))
            await self.audit.record_many([*before, failed], change=change)
            raise
        now = utcnow()
        expires = now + timedelta(seconds=row.ttl_s) if row.ttl_s else None
        running = _Setter(
            row.id,
            state="running",
            node_id=info.node_id,
            started_at=now,
            expires_at=expires,
            last_active_at=now,
            stopped_at=None,
            failure=None,
            isolation=info.isolation.as_dict() if info.isolation else None,  # the actor's word
        )
        started = self._event(principal, "sandbox.start", row, {"node_id": info.node_id})
        # The new state and its audit events: one transaction, one commit.
        await self.audit.record_many([*before, started], change=running)
        self.live[row.id] = Live(row.namespace_id, actor)
        return running.row

    async def _claim_start(self, row: SandboxRow, limits: SandboxLimits) -> bool:
        """Move the record to `starting`, False if another request got there first; a sandbox
        that was not live (stopped, failed, lost) is admitted against its namespace's quotas
        first, in the same transaction (see quotas.admit)."""
        async with self.db.admin_session() as session:
            await quotas.lock_namespace(session, row.namespace_id)  # before reading the state
            current = await session.get(SandboxRow, row.id, populate_existing=True)
            if current is None or current.state not in _STARTABLE:
                return False
            if current.state not in quotas.LIVE_STATES:
                await quotas.admit(session, row.namespace_id, limits, self.settings.quotas)
            current.state, current.updated_at = "starting", utcnow()
        return True

    # -- exec: the namespace's concurrent_execs quota ----------------------------------------

    async def run(self, principal: Principal, sandbox_id: str, request: ExecRequest) -> ExecOut:
        live = await self._resolve(principal, sandbox_id, "sandboxes:write")
        with await self.exec_quota.slot(live.namespace_id):
            return await super().run(principal, sandbox_id, request)

    async def exec_stream(
        self,
        principal: Principal,
        sandbox_id: str,
        request: ExecRequest,
        interactive: bool = False,
    ) -> AsyncIterator[ExecEvent]:
        live = await self._resolve(principal, sandbox_id, "sandboxes:write")
        with await self.exec_quota.slot(live.namespace_id):
            async for event in super().exec_stream(principal, sandbox_id, request, interactive):
                yield event

    async def ensure_running(self, principal: Principal, sandbox_id: str) -> None:
        """As an exec would fail before it starts, its quota included (a stream answers 429
        rather than an error event where it can)."""
        live = await self._resolve(principal, sandbox_id, "sandboxes:write")
        await self.exec_quota.check(live.namespace_id)

    async def stop(
        self, principal: Principal, sandbox_id: str, reason: str = "requested"
    ) -> SandboxOut:
        principal.require("sandboxes:write")
        row = await self._load(principal, sandbox_id)
        return sandbox_out(await self._stop(principal, row, reason))

    async def _stop(self, principal: Principal, row: SandboxRow, reason: str) -> SandboxRow:
        row = await self._settled(principal, row)
        if row.state != "running":
            return row
        if not await self._transition(row.id, ("running",), "stopping"):
            # Another request is stopping it: answer with the outcome of that stop.
            return await self._settled(principal, await self._load(principal, row.id))
        live = self.live.pop(row.id, None)
        with span("sandbox.stop", sandbox_id=row.id, reason=reason):
            await remote.stop(row.id, live.actor if live else None)
        self.active.pop(row.id, None)
        row = await self._set(row.id, state="stopped", stopped_at=utcnow(), expires_at=None)
        await self.keys.revoke_sandbox_keys(row.id, principal.key_id)  # a new one on start
        await self._audit(principal, "sandbox.stop", row, {"reason": reason})
        return row

    async def _settled(self, principal: Principal, row: SandboxRow) -> SandboxRow:
        """The record once the request that is starting or stopping it is done (or, should that
        request have died with its replica, once waiting longer makes no sense)."""
        deadline = time.monotonic() + SETTLE_WAIT_S
        while row.state in _MOVING and time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
            row = await self._load(principal, row.id)
        return row

    async def delete(self, principal: Principal, sandbox_id: str) -> None:
        """Stop it if it runs, revoke its key, hide it from lists; its history stays."""
        principal.require("sandboxes:write")
        row = await self._stop(principal, await self._load(principal, sandbox_id), "deleted")
        if row.state in ("starting", "stopping"):
            raise_state(row, "delete")
        if not await self._transition(row.id, _DELETABLE, "deleted"):
            return  # a concurrent delete won: it revokes and audits, once
        await self.keys.revoke_sandbox_keys(row.id, principal.key_id)  # one never started too
        await self._audit(principal, "sandbox.delete", row, {})

    # -- read --------------------------------------------------------------------------------

    async def get(self, principal: Principal, sandbox_id: str) -> SandboxOut:
        principal.require("sandboxes:read", sandbox_id)  # a sandbox's own key may read it
        return sandbox_out(await self._load(principal, sandbox_id))

    async def list(
        self,
        principal: Principal,
        *,
        state: str | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        namespace: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SandboxPage:
        principal.require("sandboxes:read")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgumentError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        query = select(SandboxRow).order_by(SandboxRow.created_at.desc(), SandboxRow.id.desc())
        query = query.where(SandboxRow.state == state if state else SandboxRow.state != "deleted")
        if name:
            query = query.where(SandboxRow.name == name)
        if namespace:
            query = query.where(SandboxRow.namespace_id == namespace)
        for key, value in (labels or {}).items():
            query = query.where(SandboxRow.labels[key].as_string() == value)
        if cursor:
            when, last_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    SandboxRow.created_at < when,
                    and_(SandboxRow.created_at == when, SandboxRow.id < last_id),
                )
            )
        async with self._session(principal) as session:
            rows = list((await session.scalars(query.limit(limit + 1))).all())
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more else None
        return SandboxPage(items=[sandbox_out(r) for r in rows], next_cursor=next_cursor)

    async def count_by_state(self) -> dict[str, int]:
        """Sandboxes per state across every namespace (the metrics gauge)."""
        query = select(SandboxRow.state, func.count()).group_by(SandboxRow.state)
        async with self.db.read_session(None) as session:
            rows = (await session.execute(query)).all()
        return {state: int(count) for state, count in rows}

    # -- helpers -----------------------------------------------------------------------------

    def _target_namespace(self, principal: Principal, asked: str | None) -> str:
        if principal.is_admin:
            return asked or DEFAULT_NAMESPACE
        own = str(principal.namespace_id)
        if asked is not None and asked != own:
            raise ForbiddenError(f"this key acts in namespace {own!r} only, not {asked!r}")
        return own

    async def ensure_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces:
            return
        try:
            async with self.db.admin_session() as session:
                if await session.get(NamespaceRow, namespace) is None:
                    session.add(NamespaceRow(id=namespace, name=namespace))
        except ConflictError:
            pass  # created meanwhile by a concurrent request: what we wanted
        self._namespaces.add(namespace)

    async def _transition(self, sandbox_id: str, from_states: tuple[str, ...], to: str) -> bool:
        """Move the record to `to` if it is in one of `from_states`; False if another request
        got there first. This claim is what keeps two replicas from starting one sandbox twice."""
        async with self.db.admin_session() as session:
            result = await session.execute(
                update(SandboxRow)
                .where(SandboxRow.id == sandbox_id, SandboxRow.state.in_(from_states))
                .values(state=to, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def _set(self, sandbox_id: str, **values: Any) -> SandboxRow:
        setter = _Setter(sandbox_id, **values)
        async with self.db.admin_session() as session:
            await setter(session)
        return setter.row

    async def _audit(
        self,
        principal: Principal,
        action: str,
        row: SandboxRow,
        details: dict[str, object],
        outcome: Outcome = "ok",
    ) -> None:
        await self.audit.record(self._event(principal, action, row, details, outcome))

    @staticmethod
    def _event(
        principal: Principal,
        action: str,
        row: SandboxRow,
        details: dict[str, object],
        outcome: Outcome = "ok",
    ) -> AuditEvent:
        return principal.audit_event(action, row.id, row.namespace_id, details, outcome)


class _Setter:
    """Sets fields of a sandbox's record in a caller's transaction; `row` is the record after."""

    def __init__(self, sandbox_id: str, **values: Any) -> None:
        self.sandbox_id, self.values = sandbox_id, values
        self.row: SandboxRow

    async def __call__(self, session: AsyncSession) -> None:
        self.row = await _get_row(session, self.sandbox_id)
        for field, value in self.values.items():
            setattr(self.row, field, value)


async def _get_row(session: AsyncSession, sandbox_id: str) -> SandboxRow:
    row = await session.get(SandboxRow, sandbox_id)
    if row is None:
        raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")
    return row


def raise_state(row: SandboxRow, action: str) -> None:
    raise SandboxStateError(f"sandbox {row.id} is {row.state}: cannot {action} it now")
