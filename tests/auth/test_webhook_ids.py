"""The webhook replay guard in the database: one id is delivered once, whichever replica gets it."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from cave.auth import webhooks
from cave.db import Database, WebhookIdRow

pytestmark = pytest.mark.anyio


async def test_an_id_is_a_first_delivery_once(db: Database) -> None:
    event = webhooks.Verified("evt-1", int(time.time()))
    assert await webhooks.first_delivery(db, event) is True
    assert await webhooks.first_delivery(db, event) is False
    assert await webhooks.first_delivery(db, webhooks.Verified("evt-2", event.timestamp))


async def test_replicas_racing_on_one_id_let_exactly_one_through(db: Database) -> None:
    # Two Database objects: two replicas' connection pools on one database.
    other = await Database.connect(db.settings)
    try:
        event = webhooks.Verified("evt-race", int(time.time()))
        results = await asyncio.gather(
            *(webhooks.first_delivery(d, event) for d in (db, other, db, other))
        )
    finally:
        await other.close()
    assert sorted(results) == [False, False, False, True]


async def test_ids_past_their_window_are_removed(db: Database) -> None:
    old = webhooks.Verified("evt-old", int(time.time()) - 3 * webhooks.TOLERANCE_S)
    assert await webhooks.first_delivery(db, old)
    assert await webhooks.first_delivery(db, webhooks.Verified("evt-new", int(time.time())))
    async with db.admin_session() as session:
        kept = (await session.scalars(select(WebhookIdRow.event_id))).all()
    assert kept == ["evt-new"]  # the old one could not verify any more: gone
