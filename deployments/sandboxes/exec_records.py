"""ExecRecorder: execution records and their audit events, written in batches (group commit).

An exec is the hot path: one transaction plus a log fsync per exec would cost more than the exec.
Records queue here and one task writes whatever has gathered in one transaction. In `sync` mode
the request waits for its batch to commit; in `async` mode (the default) it does not, and a
replica that dies loses at most the batch in flight. See docs/api.md, "Exec records".

One bad record never takes others with it: a batch that fails for any reason but an unavailable
database is split and written again in halves, down to the one record that fails; that record's
audit event is then written without it (`details.record_error`), so no exec goes unaudited.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cave.audit.event import AuditEvent
from cave.audit.trail import AuditTrail
from cave.db import Base, ExecutionRow
from cave.errors import DatabaseUnavailableError
from cave.settings_env import load_section
from config.api import ExecRecordSettings

log = logging.getLogger("cave.api")
Mode = Literal["sync", "async"]
MAX_BATCH = 500
ASYNC_LINGER_S = 0.05
MAX_QUEUED = 50_000  # past this, requests wait for the writer (backpressure, not memory growth)
_Item = tuple[Base | None, AuditEvent, "asyncio.Future[None] | None"]
StoredArg = str | dict[str, str]


def stored_command(argv: Sequence[str]) -> list[StoredArg]:
    """The argv as JSON every database takes: an argument that is not valid Unicode (a lone
    surrogate, which is how Python and our JSON carry non-UTF-8 bytes) becomes
    `{"b64": <its bytes>}`, the bytes the command received (surrogateescape, as os.fsencode)."""
    return [_stored_arg(arg) for arg in argv]


def command_of(stored: Sequence[StoredArg]) -> list[str]:
    """The argv back from `stored_command`, exactly as it was given."""
    return [
        arg
        if isinstance(arg, str)
        else base64.b64decode(arg["b64"]).decode("utf-8", "surrogateescape")
        for arg in stored
    ]


def _stored_arg(arg: str) -> StoredArg:
    try:
        arg.encode("utf-8")
        return arg
    except UnicodeEncodeError:
        pass
    try:
        raw = arg.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte decodes to: such a command never starts
        raw = arg.encode("utf-8", "surrogatepass")
    return {"b64": base64.b64encode(raw).decode("ascii")}


def load_mode(env: Mapping[str, str]) -> Mode:
    """CAVE_EXEC_RECORDS (config.api.ExecRecordSettings)."""
    return load_section(ExecRecordSettings, env).mode


class ExecRecorder:
    def __init__(self, audit: AuditTrail, mode: Mode = "async") -> None:
        self.audit = audit
        self.mode = mode
        self._queue: list[_Item] = []
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
        if isinstance(row, ExecutionRow):
            row.command = stored_command(row.command)  # type: ignore[assignment]
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

    async def _write(self, batch: list[_Item]) -> None:
        errors = await self._store(batch)
        lost = [e for (_, _, done), e in zip(batch, errors, strict=True) if e and done is None]
        if lost:  # nobody waits to hear of these: say what was lost
            log.error("lost %d exec records: %s", len(lost), lost[0])
        for (_, _, done), error in zip(batch, errors, strict=True):
            if done is not None and not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def _store(self, batch: Sequence[_Item]) -> list[BaseException | None]:
        """Write the batch in one transaction; when that fails, in halves, so that only the item
        that fails is held back (and its event still written). An unavailable database fails
        the batch at once: splitting would only fail more times."""
        try:
            await self.audit.record_many(
                [e for _, e, _ in batch], [r for r, _, _ in batch if r is not None]
            )
            return [None] * len(batch)
        except DatabaseUnavailableError as exc:
            return [exc] * len(batch)
        except Exception as exc:
            if len(batch) > 1:
                middle = len(batch) // 2
                return await self._store(batch[:middle]) + await self._store(batch[middle:])
            return [await self._store_event_alone(batch[0], exc)]

    async def _store_event_alone(self, item: _Item, error: Exception) -> BaseException:
        """The audit event of an item whose record cannot be stored, saying so; the error is the
        record's (a sync caller hears of it)."""
        row, event, _ = item
        log.error("record of %s %s not stored: %s", event.action, event.target, error)
        if row is None:  # the event itself failed: nothing is left to try
            return error
        details: dict[str, Any] = {**event.details, "record_error": _describe(error)}
        try:
            await self.audit.record_many([dataclasses.replace(event, details=details)])
        except Exception as exc:
            log.error("audit event %s of %s lost: %s", event.id, event.target, exc)
        return error

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text[:500]  # a driver's message can quote the whole statement
