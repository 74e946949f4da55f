"""AuditTrail: each audited action goes to the database and, when enabled, the signed JSONL log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text

from cave.audit.event import AuditEvent
from cave.audit.scrub import scrub
from cave.audit.writer import AuditLogWriter
from cave.db import AuditEventRow, Database

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
        if self.scrub_details:
            event = AuditEvent(
                event.actor,
                event.action,
                scrub(event.target),
                event.outcome,
                event.namespace,
                scrub(dict(event.details)),
                event.id,
                event.ts,
            )
        async with self.db.admin_session() as session:
            if self.db.backend == "postgresql":
                await session.execute(_SEQ_LOCK)
            last = await session.scalar(select(func.max(AuditEventRow.seq)))
            seq = (last or 0) + 1
            session.add(
                AuditEventRow(
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
            )
        if self.log is not None:
            await self.log.append_async(event)
        return seq
