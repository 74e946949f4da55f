"""Liveness (`/healthz`) and readiness (`/readyz`: the database and Ray answer)."""

from __future__ import annotations

import asyncio

import ray
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from deployments.deps import ServicesDep
from deployments.schemas import Health

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
    }
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
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


def _ray() -> None:
    if not ray.is_initialized() or not any(n["Alive"] for n in ray.nodes()):
        raise RuntimeError("no alive Ray node")
