"""Delivers outbox events as signed webhooks: claimed by lease, retried with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import select, update

from cave.auth import webhooks
from cave.db import Database, OutboxRow, utcnow

log = logging.getLogger("cave.outbox")
LEASE_S = 60.0  # a claimed event is retried by anyone after this, should its dispatcher die
BASE_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0


@dataclass
class OutboxDispatcher:
    """At-least-once delivery; receivers make it exactly-once by the signed `webhook-id`
    header: an id seen before is a replay, which a receiver acknowledges with 2xx."""

    db: Database
    url: str
    secret: bytes
    client: httpx.AsyncClient
    batch: int = 50

    async def run_once(self) -> int:
        """Deliver what is due now; returns how many were delivered."""
        delivered = 0
        for row in await self._claim_due():
            error = await self._post(row)
            await self._settle(row, error)
            delivered += error is None
        return delivered

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:  # a database outage must not end the dispatcher
                log.exception("outbox dispatch failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    async def _claim_due(self) -> list[OutboxRow]:
        now = utcnow()
        claimed = []
        async with self.db.admin_session() as session:
            due = (
                await session.scalars(
                    select(OutboxRow)
                    .where(OutboxRow.delivered_at.is_(None), OutboxRow.next_attempt_at <= now)
                    .order_by(OutboxRow.created_at)
                    .limit(self.batch)
                )
            ).all()
            for row in due:  # optimistic: another dispatcher may have claimed it meanwhile
                result = await session.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id == row.id, OutboxRow.next_attempt_at == row.next_attempt_at)
                    .values(next_attempt_at=now + timedelta(seconds=LEASE_S))
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(row)
        return claimed

    async def _post(self, row: OutboxRow) -> str | None:
        body = json.dumps(row.payload, sort_keys=True, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            **webhooks.sign(body, self.secret, row.event_id),
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}"

    async def _settle(self, row: OutboxRow, error: str | None) -> None:
        values: dict[str, object]
        if error is None:
            values = {"delivered_at": utcnow(), "attempts": row.attempts + 1, "last_error": None}
        else:
            values = {
                "attempts": row.attempts + 1,
                "last_error": error[:500],
                "next_attempt_at": utcnow() + backoff(row.attempts + 1),
            }
            log.warning(
                "webhook %s not delivered (attempt %d): %s", row.event_id, row.attempts + 1, error
            )
        async with self.db.admin_session() as session:
            await session.execute(
                update(OutboxRow)
                .where(OutboxRow.id == row.id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )


def backoff(attempt: int) -> timedelta:
    """Exponential with full jitter, capped: spreads retries of many events over time."""
    ceiling = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** min(attempt, 20))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))
