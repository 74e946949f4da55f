"""ExecRecorder: execution records and their audit events, written in batches (group commit).

An exec is the hot path: one transaction plus a log fsync per exec would cost more than the exec.
Records queue here and one task writes whatever has gathered in one transaction. In `sync` mode
the request waits for its batch to commit; in `async` mode (the default) it does not, and a
replica that dies loses at most the batch in flight. See docs/api.md, "Exec records".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Literal

from cave.audit.event import AuditEvent
from cave.audit.trail import AuditTrail
from cave.db import Base
from cave.env import env_choice

log = logging.getLogger("cave.api")
Mode = Literal["sync", "async"]
MODES: tuple[Mode, ...] = ("async", "sync")
MAX_BATCH = 500
ASYNC_LINGER_S = 0.05
MAX_QUEUED = 50_000  # past this, requests wait for the writer (backpressure, not memory growth)


def load_mode(env: Mapping[str, str]) -> Mode:
    return "sync" if env_choice(env, "CAVE_EXEC_RECORDS", "async", MODES) == "sync" else "async"


class ExecRecorder:
    def __init__(self, audit: AuditTrail, mode: Mode = "async") -> None:
        self.audit = audit
        self.mode = mode
        self._queue: list[tuple[Base | None, AuditEvent, asyncio.Future[None] | None]] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def record(self, event: AuditEvent, row: Base | None = None) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cave-exec-records")
        while len(self._queue) >= MAX_QUEUED:
            self._room.clear()
            await self._room.wait()
        done = asyncio.get_running_loop().create_future() if self.mode == "sync" else None
        self._queue.append((row, event, done))
        self._wake.set()
        if done is not None:
            await done

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wake.wait()
            self._wake.clear()
            if self.mode == "async" and not self._closing:
                # Nobody waits for these: gather more per transaction, and keep the writing off
                # the CPU while the request that queued it is still being answered.
                await asyncio.sleep(ASYNC_LINGER_S)
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._room.set()
                await self._write(batch)

    async def _write(
        self, batch: list[tuple[Base | None, AuditEvent, asyncio.Future[None] | None]]
    ) -> None:
        error: BaseException | None = None
        try:
            await self.audit.record_many(
                [e for _, e, _ in batch], [r for r, _, _ in batch if r is not None]
            )
        except Exception as exc:  # the database is away: sync callers hear of it, async ones
            error = exc  # cannot, so it is logged with what was lost
            if all(done is None for _, _, done in batch):
                log.error("lost %d exec records: %s", len(batch), exc)
        for _, _, done in batch:
            if done is not None and not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
