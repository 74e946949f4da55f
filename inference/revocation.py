"""RevocationCache: the revoked model-access tokens (jti) not yet expired, read from the database.

Each gateway replica holds one and runs `run()` (a `refresh()` about every 0.5 s): a revocation
committed on any replica is honoured everywhere within one interval plus the read. The replica
that revoked also calls `revoke_local` and honours it at once. The loop survives every error
(backing off up to BACKOFF_MAX_S), and `check_fresh` refuses to vouch for a view older than
`max_age_s`: a replica that cannot read the table refuses model-access keys, never fails open.
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
from cave.errors import RevocationsStaleError
from config.llm import MAX_LEEWAY_S

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.5
# Each read goes back this far before the newest revocation already seen: a revocation whose
# transaction committed late, or whose replica's clock lags, must not slip past the mark.
OVERLAP_S = 30.0
FULL_EVERY_S = 300.0  # and now and then everything is read again, whatever the marks say
MAX_AGE_S = 5.0  # CAVE_LLM_REVOCATION_MAX_AGE_S: an older view refuses model-access keys
BACKOFF_MAX_S = 5.0  # failed reads are retried after 2x, 4x... the interval, at most this
# Kept this long past `exp + leeway` too: a token's exp is whole seconds, clocks drift a little.
KEEP_MARGIN_S = 60.0


class RevocationCache:
    """The set of revoked jtis that could still verify; `is_revoked` is a dict lookup."""

    def __init__(
        self,
        db: Database,
        overlap_s: float = OVERLAP_S,
        full_every_s: float = FULL_EVERY_S,
        leeway_s: float = MAX_LEEWAY_S,
        max_age_s: float = MAX_AGE_S,
    ) -> None:
        """`leeway_s`: the verifier's CAVE_LLM_LEEWAY_S (default: the largest it may be); a
        revoked token is kept until its `exp + leeway_s` (+ KEEP_MARGIN_S), since the verifier
        accepts it until then. `max_age_s`: CAVE_LLM_REVOCATION_MAX_AGE_S."""
        self._db = db
        self._overlap = timedelta(seconds=overlap_s)
        self._full_every_s = full_every_s
        self._keep_s = leeway_s + KEEP_MARGIN_S
        self.max_age_s = max_age_s
        self._revoked: dict[str, float] = {}  # jti -> the token's expiry (epoch s)
        self._next_expiry = math.inf  # nothing to prune before this (epoch s)
        self._newest: datetime | None = None  # newest revoked_at read so far
        self._full_at = -math.inf  # time.monotonic() of the last full read
        self._refreshed_at: float | None = None
        self._fresh_until = -math.inf  # time.monotonic() past which the view is stale
        self._retry_at = -math.inf  # time.monotonic() of the loop's next attempt
        self.failures = 0  # consecutive failed refreshes (0: the last one succeeded)
        self.last_error: str | None = None
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
        """Seconds since the last successful refresh began (inf before the first one)."""
        if self._refreshed_at is None:
            return math.inf
        return time.monotonic() - self._refreshed_at

    def check_fresh(self) -> None:
        """RevocationsStaleError when the view is older than `max_age_s`: a revocation may have
        been committed that this replica cannot know of. One clock read: the hot path."""
        now = time.monotonic()
        if now < self._fresh_until:
            return
        age = "ever" if self._refreshed_at is None else f"for {self.age_s():.0f} s"
        raise RevocationsStaleError(
            f"this gateway replica has not read the revoked model-access keys {age} (a view "
            f"older than {self.max_age_s:g} s is not trusted); retry shortly",
            max(1.0, self._retry_at - now),
        )

    async def refresh(self) -> int:
        """Read the revocations since the last refresh and drop expired ones; returns how many
        rows the read returned. Concurrent calls share one read."""
        asked = time.monotonic()
        async with self._lock:
            if self._refreshed_at is not None and self._refreshed_at >= asked:
                return 0
            return await self._read()

    async def run(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Refresh every `interval_s` until cancelled. Whatever a read raises (the database
        away, a table gone, a bug) is logged and retried with capped exponential backoff: the
        loop only ends when cancelled."""
        while True:
            delay = interval_s
            try:
                await self.refresh()
            except Exception as error:  # the loop must outlive every failure, bugs too
                delay = self._failed(error, interval_s)
            self._retry_at = time.monotonic() + delay
            await asyncio.sleep(delay)

    def _failed(self, error: Exception, interval_s: float) -> float:
        self.failures += 1
        self.last_error = f"{type(error).__name__}: {error}"[:300]
        delay = min(BACKOFF_MAX_S, interval_s * 2.0**self.failures)
        log.warning(
            "revocation refresh failed %d time(s), view %.1f s old, retry in %.1f s: %s",
            self.failures,
            self.age_s(),
            delay,
            self.last_error,
        )
        return delay

    async def _read(self) -> int:
        started = time.monotonic()
        now = utcnow()
        kept_since = now - timedelta(seconds=self._keep_s)
        full = self._newest is None or started - self._full_at >= self._full_every_s
        since = None if full or self._newest is None else self._newest - self._overlap
        async with self._db.read_session(None) as session:
            rows = (await session.execute(_revoked(kept_since, since))).all()
        for jti, revoked_at, expires_at in rows:
            self._add(jti, expires_at.timestamp())
            if self._newest is None or revoked_at > self._newest:
                self._newest = revoked_at
        if full:
            self._full_at = started
        self._prune(kept_since.timestamp())
        self._refreshed_at = started
        self._fresh_until = started + self.max_age_s
        if self.failures:
            log.info("revocation refresh works again after %d failure(s)", self.failures)
        self.failures, self.last_error = 0, None
        return len(rows)

    def _add(self, jti: str, expires_s: float) -> None:
        self._revoked[jti] = expires_s
        self._next_expiry = min(self._next_expiry, expires_s)

    def _prune(self, expired_before_s: float) -> None:
        # A whole pass only when something has expired since the last one.
        if expired_before_s < self._next_expiry:
            return
        kept = {jti: exp for jti, exp in self._revoked.items() if exp > expired_before_s}
        self._revoked = kept
        self._next_expiry = min(kept.values(), default=math.inf)


def _revoked(expired_before: datetime, since: datetime | None) -> Any:
    token = ModelAccessTokenRow
    query = select(token.id, token.revoked_at, token.expires_at).where(
        token.revoked_at.is_not(None), token.expires_at > expired_before
    )
    return query if since is None else query.where(token.revoked_at > since)
