"""AuditTrail: each audited action goes to the database and, when enabled, the signed JSONL log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text

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

    async def record_many(self, events: Sequence[AuditEvent], rows: Sequence[Base] = ()) -> int:
        """Store the events, and other rows that belong with them (an execution record), in one
        transaction: a whole batch costs one commit. Returns the last event's db seq."""
        events = [self._scrubbed(e) for e in events] if self.scrub_details else list(events)
        async with self.db.admin_session() as session:
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
