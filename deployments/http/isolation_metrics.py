"""Isolation in /metrics: each sandbox node's guarantees, refusing nodes, degraded sandboxes."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Gauge
from sqlalchemy import select

from actors import remote
from actors.isolation.guarantees import Isolation
from cave.db import SandboxRow
from deployments.http.metrics import ApiMetrics
from deployments.sandboxes.manager import SandboxManager

log = logging.getLogger(__name__)
GUARANTEES = ("namespaces", "seccomp", "cgroups", "overlayfs")


class IsolationMetrics:
    """Gauges in the app's registry, refreshed at each scrape (ApiMetrics.add_refresher)."""

    def __init__(self, metrics: ApiMetrics, manager: SandboxManager, timeout_s: float = 5.0):
        self._manager, self._timeout_s = manager, timeout_s
        self._guarantee = Gauge(
            "cave_isolation_guarantee",
            "1 when the sandboxes a node starts get this guarantee, else 0.",
            ["node_id", "backend", "guarantee"],
            registry=metrics.registry,
        )
        self._refusing = Gauge(
            "cave_isolation_refusing_nodes",
            "Sandbox nodes that refuse to start sandboxes (CAVE_ENV=production, not isolated).",
            registry=metrics.registry,
        )
        self._degraded = Gauge(
            "cave_sandboxes_degraded",
            "Running sandboxes without namespaces, seccomp or cgroups (never in production).",
            registry=metrics.registry,
        )
        metrics.add_refresher(self.refresh)

    async def refresh(self) -> None:
        # Nodes come and go: the per-node series are rebuilt from the current table each time.
        self._guarantee.clear()
        try:
            found = await asyncio.wait_for(
                remote.isolation_by_node(self._manager.settings), self._timeout_s
            )
            degraded = await asyncio.wait_for(self._count_degraded(), self._timeout_s)
        except Exception:  # the directory or database is away: no isolation series this time
            log.warning("reading the isolation of sandbox nodes for /metrics failed", exc_info=True)
            return
        reports = {n: r for n, r in found.items() if isinstance(r, Isolation)}
        for node_id, report in reports.items():
            for name in GUARANTEES:
                value = float(getattr(report, name))
                self._guarantee.labels(node_id, report.backend, name).set(value)
        self._refusing.set(len(found) - len(reports))
        self._degraded.set(degraded)

    async def _count_degraded(self) -> int:
        query = select(SandboxRow.isolation).where(SandboxRow.state == "running")
        async with self._manager.db.read_session(None) as session:
            rows = (await session.scalars(query)).all()
        return sum(1 for isolation in rows if isolation and isolation.get("degraded"))
