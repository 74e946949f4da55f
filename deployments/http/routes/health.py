"""Liveness (`/healthz`) and readiness (`/readyz`: the database and Ray answer, and no sandbox
node refuses to isolate, as one does under CAVE_ENV=production without full isolation)."""

from __future__ import annotations

import asyncio

import ray
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from actors import remote
from actors.isolation.guarantees import Isolation
from cave.errors import CaveError
from deployments.http.deps import ServicesDep
from deployments.schemas import Health, IsolationOut

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(services: ServicesDep) -> JSONResponse:
    checks = {
        "database": await _check(_database(services)),
        "ray": await _check(asyncio.to_thread(_ray)),
        "model_revocations": _revocations(services),
    }
    isolation, checks["isolation"] = await _isolation(services)
    # Degraded isolation happens only outside production, where it is allowed, and said so.
    ready = all(v == "ok" or v.startswith("degraded:") for v in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks, isolation=isolation)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def _check(probe: object) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)  # type: ignore[arg-type]
    except Exception as exc:  # a readiness probe reports, it never raises
        return f"failed: {type(exc).__name__}: {exc}"[:200]
    return "ok"


async def _database(services: ServicesDep) -> None:
    async with services.db.admin_session() as session:
        await session.execute(text("SELECT 1"))


def _revocations(services: ServicesDep) -> str:
    """Whether this replica's view of revoked model-access keys is fresh enough to trust."""
    revocations = services.llm.revocations
    try:
        revocations.check_fresh()
    except CaveError as exc:  # stale: model-access keys are refused (503) until it refreshes
        return f"failed: {exc.message} ({revocations.last_error or 'no read yet'})"[:300]
    return "ok"


def _ray() -> None:
    if not ray.is_initialized() or not any(n["Alive"] for n in ray.nodes()):
        raise RuntimeError("no alive Ray node")


async def _isolation(services: ServicesDep) -> tuple[dict[str, IsolationOut], str]:
    """Each sandbox node's isolation, and the check's verdict: ok, degraded: or failed:."""
    try:
        found = await asyncio.wait_for(remote.isolation_by_node(services.settings), CHECK_TIMEOUT_S)
    except Exception as exc:  # a readiness probe reports, it never raises
        return {}, f"failed: {type(exc).__name__}: {exc}"[:200]
    reports = {n: r for n, r in found.items() if isinstance(r, Isolation)}
    shown = {n: IsolationOut.model_validate(r.as_dict()) for n, r in reports.items()}
    refused = {n: r for n, r in found.items() if isinstance(r, CaveError)}
    if refused:
        node, error = next(iter(sorted(refused.items())))
        return shown, f"failed: node {node} refuses to start sandboxes: {error.message}"[:1000]
    degraded = {n: r for n, r in reports.items() if r.degraded}
    if degraded:
        node, report = next(iter(sorted(degraded.items())))
        return shown, (
            f"degraded: {len(degraded)} of {len(reports)} sandbox nodes do not fully isolate; "
            f"node {node}: {report.describe()}"
        )[:1000]
    return shown, "ok"
