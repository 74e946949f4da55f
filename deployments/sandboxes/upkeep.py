"""What keeps records and actors in step over time: activity flushes, ttl and idle expiry, and
reconciliation with the actors that really exist (a sandbox whose actor is gone becomes `lost`)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update

from actors import remote
from cave.auth.keys import Principal
from cave.db import SandboxRow, utcnow
from deployments.sandboxes.manager import SandboxManager

log = logging.getLogger("cave.api")
SYSTEM = Principal("system", "admin", None, frozenset())
# A record caught mid-transition for this long belongs to a request that died with its replica.
STALE_TRANSITION_S = 120.0


async def flush_activity(manager: SandboxManager) -> int:
    """Write the last-activity times gathered since the previous flush (idle timeouts read them);
    a sandbox with a call running now is active now."""
    active, manager.active = manager.active, {}
    now = utcnow()
    active.update((sandbox_id, now) for sandbox_id in manager.busy)
    if not active:
        return 0
    async with manager.db.admin_session() as session:
        for sandbox_id, when in active.items():
            await session.execute(
                update(SandboxRow)
                .where(SandboxRow.id == sandbox_id, SandboxRow.state == "running")
                .values(last_active_at=when)
                .execution_options(synchronize_session=False)
            )
    return len(active)


async def expire_due(manager: SandboxManager, now: datetime | None = None) -> list[str]:
    """Stop running sandboxes past their ttl or idle timeout; returns their ids."""
    now = now or utcnow()
    await flush_activity(manager)
    query = select(SandboxRow).where(
        SandboxRow.state == "running",
        (SandboxRow.expires_at <= now) | SandboxRow.idle_timeout_s.is_not(None),
    )
    async with manager.db.read_session(None) as session:
        rows = (await session.scalars(query)).all()
    stopped = []
    for row in rows:
        reason = _expiry_reason(row, now)
        if reason is None:
            continue
        try:
            await manager.stop(SYSTEM, row.id, reason)
            stopped.append(row.id)
        except Exception:  # one stuck sandbox must not keep the others running past their time
            log.exception("stopping expired sandbox %s failed", row.id)
    return stopped


def _expiry_reason(row: SandboxRow, now: datetime) -> str | None:
    if row.expires_at is not None and row.expires_at <= now:
        return "ttl"
    if row.idle_timeout_s is not None:
        last = row.last_active_at or row.started_at or row.created_at
        if last + timedelta(seconds=row.idle_timeout_s) <= now:
            return "idle"
    return None


async def reconcile(manager: SandboxManager) -> list[str]:
    """Mark `lost` the running sandboxes whose actors are gone; returns their ids."""
    stale = utcnow() - timedelta(seconds=STALE_TRANSITION_S)
    query = select(SandboxRow.id, SandboxRow.state).where(
        (SandboxRow.state == "running")
        | (SandboxRow.state.in_(("starting", "stopping")) & (SandboxRow.updated_at < stale))
    )
    async with manager.db.read_session(None) as session:
        candidates = [(r.id, r.state) for r in (await session.execute(query)).all()]
    # Not only unregistered ones: an actor killed or crashed behind our back stays registered.
    dead = await remote.dead_ids(sid for sid, _ in candidates)
    lost = [(sid, state) for sid, state in candidates if sid in dead]
    for sandbox_id, state in lost:
        await _mark_lost(manager, sandbox_id, state)
    for sandbox_id in set(manager.live) - await remote.known_ids():
        manager.live.pop(sandbox_id, None)
    await remote.ensure_pools(manager.settings)  # a node that joined gets its warm pool
    return [sid for sid, _ in lost]


async def lose_dead_nodes(manager: SandboxManager) -> list[str]:
    """Mark `lost` the sandboxes registered on nodes Ray reports dead: one directory call per
    tick, so a node's loss shows within about a tick of Ray noticing it."""
    gone = await remote.on_dead_nodes()
    if not gone:
        return []
    query = select(SandboxRow.id, SandboxRow.state).where(
        SandboxRow.id.in_(gone), SandboxRow.state.in_(("running", "starting", "stopping"))
    )
    async with manager.db.read_session(None) as session:
        rows = [(r.id, r.state) for r in (await session.execute(query)).all()]
    for sandbox_id, state in rows:
        await _mark_lost(manager, sandbox_id, state)
    for sandbox_id in set(gone) - {sid for sid, _ in rows}:
        await remote.forget(sandbox_id)  # stopped meanwhile, or a driver's: nothing to record
    return [sid for sid, _ in rows]


async def _mark_lost(manager: SandboxManager, sandbox_id: str, state: str) -> None:
    # The dead actor's entry goes first: once the record says `lost`, a start may register a
    # new actor under this id, which a later removal would wrongly drop.
    await remote.forget(sandbox_id)
    async with manager.db.admin_session() as session:
        result = await session.execute(
            update(SandboxRow)
            .where(SandboxRow.id == sandbox_id, SandboxRow.state == state)
            .values(
                state="lost",
                failure="its actor is gone (its node died or the cluster restarted)",
                stopped_at=utcnow(),
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        manager.live.pop(sandbox_id, None)
        await manager.keys.revoke_sandbox_keys(sandbox_id)  # a new one if it is started again
        log.warning("sandbox %s is lost: its actor is gone", sandbox_id)
