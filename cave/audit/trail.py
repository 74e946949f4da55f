"""AuditTrail: each audited action goes to the database and, when enabled, the signed JSONL log."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from cave.audit.event import AuditEvent
from cave.audit.scrub import scrub
from cave.audit.writer import AuditLogWriter
from cave.db import AuditEventRow, Base, Database

# Serialises seq allocation on PostgreSQL; SQLite transactions already begin IMMEDIATE.
_SEQ_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('cave.audit_events.seq'))")


@dataclass
class AuditTrail:
    db: Database
    log: AuditLogWriter | None = None  # None: CAVE_AUDIT_LOG_ENABLED is off
    scrub_details: bool = False  # BKG_SCRUB_LOGS

    async def record(self, event: AuditEvent) -> int:
        """Store the event (after the action it describes has committed); returns its db seq.

        The database row gets its own gap-free sequence, allocated under a lock so that
        concurrent writers (several API replicas) never collide; the JSONL line carries the log's
        own sequence and hash chain.
        """
        return await self.record_many([event])

    async def record_many(
        self,
        events: Sequence[AuditEvent],
        rows: Sequence[Base] = (),
        change: Callable[[AsyncSession], Awaitable[None]] | None = None,
    ) -> int:
        """Store the events, and other rows that belong with them (an execution record), in one
        transaction: a whole batch costs one commit. `change`: the action the events describe,
        made in that same transaction (both or neither). Returns the last event's db seq."""
        events = [_storable(e) for e in events]
        if self.scrub_details:
            events = [self._scrubbed(e) for e in events]
        async with self.db.admin_session() as session:
            if change is not None:
                await change(session)
            session.add_all(rows)
            if self.db.backend == "postgresql":
                await session.execute(_SEQ_LOCK)
            seq = await session.scalar(select(func.max(AuditEventRow.seq))) or 0
            for event in events:
                seq += 1
                session.add(_row(event, seq))
        if self.log is not None:
            # Tasks enqueue in order before any waits, so the batch shares one fsync.
            await asyncio.gather(*(self.log.append_async(event) for event in events))
        return seq

    @staticmethod
    def _scrubbed(event: AuditEvent) -> AuditEvent:
        return AuditEvent(
            event.actor,
            event.action,
            scrub(event.target),
            event.outcome,
            event.namespace,
            scrub(dict(event.details)),
            event.id,
            event.ts,
        )


def _row(event: AuditEvent, seq: int) -> AuditEventRow:
    return AuditEventRow(
        id=event.id,
        seq=seq,
        namespace_id=event.namespace,
        actor=event.actor,
        action=event.action,
        target=event.target,
        outcome=event.outcome,
        details=dict(event.details),
        ts=datetime.fromisoformat(event.ts),
    )


def _storable(event: AuditEvent) -> AuditEvent:
    """The event with any lone surrogate (how Python carries non-UTF-8 bytes) in its target or
    details written as its `\\udcff` escape: neither PostgreSQL nor the UTF-8 log takes one, and
    one such event must not fail the batch it is written with."""
    target, details = _text(event.target), _json_text(event.details)
    if target is event.target and details is event.details:
        return event
    return dataclasses.replace(event, target=target, details=details)


def _text(value: str) -> str:
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


def _json_text(value: Any) -> Any:
    """`value` itself when nothing in it needs escaping, else a copy with the strings escaped."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, Mapping):
        pairs = [(_json_text(k), _json_text(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, value.items(), strict=True)):
            return value
        return dict(pairs)
    if isinstance(value, list | tuple):
        items = [_json_text(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value
