"""The CAVE API as a target of bench.api_ingress: `python -m bench.api_ingress --target
bench.api_cave:CAVE` (figures in docs/benchmarks.md and docs/ingress.md)."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

from bench.api_ingress import Target
from bench.http_load import HttpConnection, Request, Scenario, UnexpectedResponse, send

SANDBOXES = "/api/v1/sandboxes"


def prepare(workdir: str) -> dict[str, Any]:
    """This cluster's own database, secrets and state, and an admin key in it."""
    from cave.auth.bootstrap import create_admin_key

    env = {
        "BKG_DB_PATH": f"{workdir}/cave.db",
        "CAVE_SECRETS_DIR": f"{workdir}/secrets",
        "CAVE_STATE_DIR": f"{workdir}/state",
        "CAVE_POOL_SIZE": os.environ.get("CAVE_POOL_SIZE", "4"),
        "CAVE_AUDIT_LOG_ENABLED": "true",
        "CAVE_AUDIT_LOG_PATH": f"{workdir}/audit/audit.jsonl",
        "CAVE_AUDIT_LOG_HMAC_KEY": base64.b64encode(secrets.token_bytes(32)).decode().rstrip("="),
    }
    return {"env": env, "admin_key": asyncio.run(create_admin_key({**os.environ, **env}))}


def serve_app(context: Mapping[str, Any]) -> Any:
    from deployments.http.app import build_app

    return build_app({"env": context["env"]})


def asgi_app(context: Mapping[str, Any]) -> Any:
    from deployments.http.app import create_api

    return create_api(context["env"])


def scenarios(context: Mapping[str, Any]) -> list[Scenario]:
    auth = {"authorization": f"Bearer {context['admin_key']}"}
    shared: dict[str, str] = {}
    lock = asyncio.Lock()

    def create(i: int) -> Request:
        body = {"name": f"bench-{i}"}
        return Request.json("POST", SANDBOXES, body, headers=auth, expect_status=201)

    def stop(sandbox_id: str) -> Request:
        return Request("POST", f"{SANDBOXES}/{sandbox_id}/stop", auth)

    async def one_sandbox(conn: HttpConnection) -> str:
        async with lock:  # the first client to warm up creates the sandbox all of them use
            if "id" not in shared:
                shared["id"] = (await send(conn, create(0))).json()["id"]
        return shared["id"]

    async def get(conn: HttpConnection, i: int) -> float:
        req = Request("GET", f"{SANDBOXES}/{await one_sandbox(conn)}", auth)
        start = time.perf_counter()
        await send(conn, req)
        return time.perf_counter() - start

    async def exec_true(conn: HttpConnection, i: int) -> float:
        path = f"{SANDBOXES}/{await one_sandbox(conn)}/exec"
        req = Request.json("POST", path, {"command": ["true"]}, headers=auth)
        start = time.perf_counter()
        resp = await send(conn, req)
        elapsed = time.perf_counter() - start
        if resp.json()["exit_code"] != 0:
            raise UnexpectedResponse(f"`true` failed: {resp.body[:200]!r}")
        return elapsed

    async def create_then_stop(conn: HttpConnection, i: int) -> float:
        start = time.perf_counter()
        resp = await send(conn, create(i))
        elapsed = time.perf_counter() - start
        await send(conn, stop(resp.json()["id"]))
        return elapsed

    async def stop_created(conn: HttpConnection, i: int) -> float:
        sandbox_id = (await send(conn, create(i))).json()["id"]
        start = time.perf_counter()
        await send(conn, stop(sandbox_id))
        return time.perf_counter() - start

    return [
        Scenario("GET /api/v1/sandboxes/{id}", get, 1, 300, 10),
        Scenario("GET /api/v1/sandboxes/{id}, 16 clients", get, 16, 1600, 5),
        Scenario("exec true (JSON result)", exec_true, 1, 200, 10),
        Scenario("create", create_then_stop, 1, 30, 2),
        Scenario("stop", stop_created, 1, 30, 2),
    ]


CAVE = Target(
    serve_app="bench.api_cave:serve_app",
    asgi_app="bench.api_cave:asgi_app",
    scenarios="bench.api_cave:scenarios",
    prepare="bench.api_cave:prepare",
    ready_path="/readyz",
)
