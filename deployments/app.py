"""The API application: `create_api` builds the FastAPI app (served by Ray Serve, or by plain
uvicorn for comparison), `ApiIngress` is its Serve deployment, `build_app` the Serve entry point."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI
from ray import serve

from deployments.background import Upkeep
from deployments.errors import RequestIdMiddleware, install_error_handlers
from deployments.metrics import ApiMetrics, install_metrics
from deployments.routes import exec as exec_routes
from deployments.routes import files, health, keys, sandboxes
from deployments.services import Services

log = logging.getLogger("cave.api")
API_VERSION = "0.1.0"
APP_NAME = "cave"


def create_api(env: Mapping[str, str] | None = None, replica: str = "") -> FastAPI:
    """The app; its services start with it (lifespan) from `env` over os.environ."""
    metrics = ApiMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.start(env, replica)
        app.state.services = services
        metrics.set_sandbox_counter(services.sandboxes.count_by_state)
        upkeep = Upkeep(services, {**os.environ, **(env or {})})
        upkeep.start()
        try:
            yield
        finally:
            await upkeep.stop()
            await services.close()

    app = FastAPI(
        title="CAVE API",
        version=API_VERSION,
        description="Isolated code sandboxes and governed model access. See docs/api.md.",
        lifespan=lifespan,
    )
    install_error_handlers(app, metrics.count_error)
    app.state.metrics = metrics
    for module in (sandboxes, exec_routes, files, keys, health):
        app.include_router(module.router)
    install_metrics(app, metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response and log line has an id
    return app


@serve.deployment(
    name="ApiIngress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    health_check_period_s=5,
)
@serve.ingress()
class ApiIngress:
    """One API replica. Settings come as an environment mapping (the deployment's args) laid
    over the replica's own environment, so that `serve run` and `cave up` configure it alike."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(env or {})
        context = serve.get_replica_context()
        self._replica = context.replica_tag if context is not None else ""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self._env, _file_safe(self._replica))


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run deployments.app:build_app env.BKG_DB_PATH=...` or a config file's `args`:
    `{"env": {...}, "num_replicas": N}`; anything else in args is an error, not ignored."""
    known = {"env", "num_replicas"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown build_app args {unknown}; known: {sorted(known)}")
    env = {str(k): str(v) for k, v in dict(args.get("env") or {}).items()}
    deployment: Any = ApiIngress  # serve.deployment made it a Deployment; its stubs can't say
    if "num_replicas" in args:
        deployment = deployment.options(num_replicas=int(args["num_replicas"]))
    return deployment.bind(env)


def _file_safe(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in tag)
