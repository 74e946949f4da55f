"""Upkeep: one task per replica that expires sandboxes, reconciles them with their actors,
flushes batched last-use times, and delivers the webhook outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

import httpx

from cave.auth.outbox import OutboxDispatcher
from deployments.http.services import Services
from deployments.sandboxes.upkeep import expire_due, lose_dead_nodes, reconcile

log = logging.getLogger("cave.api")
RECONCILE_EVERY = 5  # ticks: a lost sandbox shows within about five seconds


class Upkeep:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.interval_s = services.config.upkeep.interval_s  # CAVE_UPKEEP_INTERVAL_S
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._dispatcher: OutboxDispatcher | None = None
        auth = services.auth
        if auth.webhook_url and auth.webhook_secret:
            self._client = httpx.AsyncClient(timeout=10.0)
            self._dispatcher = OutboxDispatcher(
                services.db, auth.webhook_url, auth.webhook_secret, self._client
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cave-upkeep")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        tick = 0
        await _guarded("reconcile", reconcile(self.services.sandboxes))  # a restart's first job
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            if self._stop.is_set():
                return
            tick += 1
            await _guarded("expiry", expire_due(self.services.sandboxes))
            await _guarded("node loss", lose_dead_nodes(self.services.sandboxes))
            if tick % RECONCILE_EVERY == 0:
                await _guarded("reconcile", reconcile(self.services.sandboxes))
                await _guarded("key use flush", self.services.keys.flush_last_used())
            if self._dispatcher is not None:
                await _guarded("outbox", self._dispatcher.run_once())


async def _guarded(what: str, work: Awaitable[object]) -> None:
    """A failing step (the database is away) is logged; upkeep goes on at the next tick."""
    try:
        await work
    except Exception:
        log.exception("upkeep: %s failed", what)
