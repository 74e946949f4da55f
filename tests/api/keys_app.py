"""The key routes of a CAVE API on a database of the test's choosing (SQLite or PostgreSQL),
over httpx.ASGITransport: the key attacks run on both backends, with no Ray needed."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

from cave.auth.bootstrap import create_admin_key
from deployments.http.errors import RequestIdMiddleware, install_error_handlers
from deployments.http.routes import keys
from deployments.http.services import Services

WEBHOOK_SECRET = "test-webhook-secret"


@dataclass(frozen=True)
class KeysApi:
    client: httpx.AsyncClient  # no key of its own: pass headers=auth(key)
    admin_key: str
    services: Services


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_env(
    database_env: dict[str, str], root: Path, webhook_secret: bool = True
) -> dict[str, str]:
    env = {
        **database_env,
        "CAVE_SECRETS_DIR": str(root / "secrets"),
        "CAVE_STATE_DIR": str(root / "state"),
        "CAVE_AUDIT_LOG_ENABLED": "false",
    }
    if webhook_secret:
        env["CAVE_ROTATION_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    return env


@asynccontextmanager
async def keys_api(env: dict[str, str], admin: bool = True) -> AsyncIterator[KeysApi]:
    """One replica: its own services (and caches) on the database `env` names."""
    admin_key = await create_admin_key({**os.environ, **env}) if admin else ""
    services = await Services.start(env)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(keys.router)
    app.add_middleware(RequestIdMiddleware)
    app.state.services = services
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://cave") as client:
            yield KeysApi(client, admin_key, services)
    finally:
        await services.close()
