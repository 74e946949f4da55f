"""RevocationCache: the revoked model-access tokens (jti) not yet expired, read from the database.

Each gateway replica holds one and calls `refresh()` about every 0.5 s (or runs `run()`): a
revocation committed on any replica is honoured everywhere within one interval plus the read.
The replica that revoked also calls `revoke_local` and honours it at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from cave.db import Database, ModelAccessTokenRow, utcnow
from cave.errors import DatabaseUnavailableError

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.5
# Each read goes back this far before the newest revocation already seen: a revocation whose
# transaction committed late, or whose replica's clock lags, must not slip past the mark.
OVERLAP_S = 30.0
FULL_EVERY_S = 300.0  # and now and then everything is read again, whatever the marks say


class RevocationCache:
    """The set of revoked jtis that could still verify; `is_revoked` is a dict lookup."""

    def __init__(
        self, db: Database, overlap_s: float = OVERLAP_S, full_every_s: float = FULL_EVERY_S
    ) -> None:
        self._db = db
        self._overlap = timedelta(seconds=overlap_s)
        self._full_every_s = full_every_s
        self._revoked: dict[str, float] = {}  # jti -> the token's expiry (epoch s)
        self._next_expiry = math.inf  # nothing to prune before this (epoch s)
        self._newest: datetime | None = None  # newest revoked_at read so far
        self._full_at = -math.inf  # time.monotonic() of the last full read
        self._refreshed_at: float | None = None
        self._lock = asyncio.Lock()

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def revoke_local(self, jti: str, expires_at: datetime | None = None) -> None:
        """Honour a revocation this replica has just committed, before the next refresh.
        Without `expires_at` the entry lasts until a refresh reads the row and learns it."""
        self._add(jti, math.inf if expires_at is None else expires_at.timestamp())

    def __len__(self) -> int:
        return len(self._revoked)

    def age_s(self) -> float:
        """Seconds since the last successful refresh began (inf before the first one): a
        gateway may refuse tokens when this grows, rather than trust a stale view."""
        if self._refreshed_at is None:
            return math.inf
        return time.monotonic() - self._refreshed_at

    async def refresh(self) -> int:
        """Read the revocations since the last refresh and drop expired ones; returns how many
        rows the read returned. Concurrent calls share one read."""
        asked = time.monotonic()
        async with self._lock:
            if self._refreshed_at is not None and self._refreshed_at >= asked:
                return 0
            return await self._read()

    async def run(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Refresh every `interval_s` until cancelled; a failed read is logged and retried."""
        while True:
            try:
                await self.refresh()
            except DatabaseUnavailableError as error:
                log.warning("revocation refresh failed, %.1f s stale: %s", self.age_s(), error)
            await asyncio.sleep(interval_s)

    async def _read(self) -> int:
        started = time.monotonic()
        now = utcnow()
        full = self._newest is None or started - self._full_at >= self._full_every_s
        since = None if full or self._newest is None else self._newest - self._overlap
        async with self._db.read_session(None) as session:
            rows = (await session.execute(_revoked(now, since))).all()
        for jti, revoked_at, expires_at in rows:
            self._add(jti, expires_at.timestamp())
            if self._newest is None or revoked_at > self._newest:
                self._newest = revoked_at
        if full:
            self._full_at = started
        self._prune(now.timestamp())
        self._refreshed_at = started
        return len(rows)

    def _add(self, jti: str, expires_s: float) -> None:
        self._revoked[jti] = expires_s
        self._next_expiry = min(self._next_expiry, expires_s)

    def _prune(self, now_s: float) -> None:
        # A whole pass only when something has expired since the last one.
        if now_s < self._next_expiry:
            return
        self._revoked = {jti: exp for jti, exp in self._revoked.items() if exp > now_s}
        self._next_expiry = min(self._revoked.values(), default=math.inf)


def _revoked(now: datetime, since: datetime | None) -> Any:
    token = ModelAccessTokenRow
    query = select(token.id, token.revoked_at, token.expires_at).where(
        token.revoked_at.is_not(None), token.expires_at > now
    )
    return query if since is None else query.where(token.revoked_at > since)
