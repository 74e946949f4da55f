"""Per-namespace quotas: what a namespace may hold (sandboxes, their memory and CPU limits) and
run at once (execs), and the admission check that keeps concurrent creates from overshooting.

A sandbox counts from its creation until it stops (`LIVE_STATES`): a created one holds its
place, so that starting it later cannot fail on a quota it was admitted under.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cave.db import Database, NamespaceRow, SandboxRow
from cave.errors import QuotaExceededError
from config.settings import QuotaSettings, SandboxLimits
from deployments.schemas import NamespaceOut, NamespaceQuotas, QuotaUsage

LIVE_STATES = ("created", "starting", "running", "stopping")
QUOTAS = ("sandboxes", "memory_mb", "cpu", "concurrent_execs")
SANDBOX_RETRY_AFTER_S = 10.0  # a sandbox frees its place when stopped: seconds to minutes
EXEC_RETRY_AFTER_S = 1.0  # most execs take well under a second
QUOTA_CACHE_S = 2.0  # how stale a replica's view of a changed exec quota may be
_CPU_SLACK = 1e-9  # 0.1 + 0.2 must fit a quota of 0.3


@dataclass(frozen=True)
class Usage:
    sandboxes: int
    memory_mb: int
    cpu: float


def quotas_of(row: NamespaceRow | None, defaults: QuotaSettings) -> NamespaceQuotas:
    """The quotas in force: the admin's overrides, the defaults where there are none."""
    given = overrides_of(row).model_dump(exclude_none=True)
    return NamespaceQuotas(**{name: getattr(defaults, name) for name in QUOTAS} | given)


def overrides_of(row: NamespaceRow | None) -> NamespaceQuotas:
    if row is None:
        return NamespaceQuotas()
    return NamespaceQuotas(
        sandboxes=row.quota_sandboxes,
        memory_mb=row.quota_memory_mb,
        cpu=row.quota_cpu,
        concurrent_execs=row.quota_concurrent_execs,
    )


def set_overrides(row: NamespaceRow, quotas: NamespaceQuotas) -> None:
    row.quota_sandboxes = quotas.sandboxes
    row.quota_memory_mb = quotas.memory_mb
    row.quota_cpu = quotas.cpu
    row.quota_concurrent_execs = quotas.concurrent_execs


def namespace_out(
    row: NamespaceRow, defaults: QuotaSettings, usage: Usage | None = None
) -> NamespaceOut:
    return NamespaceOut(
        name=row.name,
        pool=row.pool,
        created_at=row.created_at,
        quotas=quotas_of(row, defaults),
        overrides=overrides_of(row),
        usage=None if usage is None else QuotaUsage(**usage.__dict__),
    )


async def usage(session: AsyncSession, namespace: str) -> Usage:
    """What the namespace's live sandboxes hold (a few dozen rows: summed here, not in SQL,
    because the limits are JSON and the two backends read JSON differently)."""
    query = select(SandboxRow.limits).where(
        SandboxRow.namespace_id == namespace, SandboxRow.state.in_(LIVE_STATES)
    )
    rows = list((await session.scalars(query)).all())
    memory = sum(int(limits.get("memory_mb", 0)) for limits in rows)
    cpu = sum(float(limits.get("cpu", 0)) for limits in rows)
    return Usage(len(rows), memory, round(cpu, 6))


async def lock_namespace(session: AsyncSession, namespace: str) -> NamespaceRow | None:
    """The namespace's row, locked until the transaction ends: admissions of one namespace queue
    here (FOR UPDATE on PostgreSQL; SQLite's writer lock, taken at BEGIN IMMEDIATE, already
    serialises every write transaction)."""
    query = select(NamespaceRow).where(NamespaceRow.id == namespace).with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def admit(
    session: AsyncSession, namespace: str, limits: SandboxLimits, defaults: QuotaSettings
) -> None:
    """Refuse (QuotaExceededError) one more live sandbox with these limits when it would take
    the namespace over a quota. Run it in the transaction that makes the sandbox live."""
    quotas = quotas_of(await lock_namespace(session, namespace), defaults)
    used = await usage(session, namespace)
    wanted = (
        ("sandboxes", quotas.sandboxes, used.sandboxes, 1),
        ("memory_mb", quotas.memory_mb, used.memory_mb, limits.memory_mb),
        ("cpu", quotas.cpu, used.cpu, limits.cpu),
    )
    for name, limit, have, adding in wanted:
        assert limit is not None  # quotas_of fills every field
        if have + adding > limit + _CPU_SLACK:
            raise QuotaExceededError(
                f"namespace {namespace!r} is at its {name} quota: {have:g} of {limit:g} in use "
                f"and this sandbox needs {adding:g} more; stop or delete a sandbox, or ask an "
                "admin to raise the quota",
                name,
                limit,
                have,
                SANDBOX_RETRY_AFTER_S,
            )


class ExecQuota:
    """Counts the execs each namespace runs on this replica and refuses one over its quota.

    Per replica, so that an exec costs no round trip to a shared counter: with R replicas a
    namespace runs at most R x its quota at once (docs/sandboxes.md)."""

    def __init__(self, db: Database, defaults: QuotaSettings) -> None:
        self.db = db
        self.defaults = defaults
        self.running: dict[str, int] = {}
        self._limits: dict[str, tuple[int, float]] = {}  # namespace -> (quota, read at)

    async def limit(self, namespace: str) -> int:
        cached = self._limits.get(namespace)
        if cached is not None and time.monotonic() - cached[1] < QUOTA_CACHE_S:
            return cached[0]
        async with self.db.read_session(None) as session:
            row = await session.get(NamespaceRow, namespace)
        value = quotas_of(row, self.defaults).concurrent_execs
        assert value is not None
        self._limits[namespace] = (value, time.monotonic())
        return value

    def forget(self, namespace: str) -> None:
        """An admin changed the namespace's quotas: read them again at the next exec."""
        self._limits.pop(namespace, None)

    async def check(self, namespace: str) -> int:
        limit = await self.limit(namespace)
        running = self.running.get(namespace, 0)
        if running >= limit:
            raise QuotaExceededError(
                f"namespace {namespace!r} runs {running} execs at once, its concurrent_execs "
                "quota: wait for one to end",
                "concurrent_execs",
                limit,
                running,
                EXEC_RETRY_AFTER_S,
            )
        return limit

    @contextmanager
    def _held(self, namespace: str) -> Iterator[None]:
        self.running[namespace] = self.running.get(namespace, 0) + 1
        try:
            yield
        finally:
            left = self.running.pop(namespace, 1) - 1
            if left > 0:
                self.running[namespace] = left

    async def slot(self, namespace: str) -> AbstractContextManager[None]:
        """A place for one exec, held in `with await quota.slot(ns):` (no await comes between
        the count's check and its increment, so this replica never runs one too many)."""
        await self.check(namespace)
        return self._held(namespace)
