"""The API application: `create_api` builds the FastAPI app (served by Ray Serve, or by plain
uvicorn for comparison), `ApiIngress` is its Serve deployment, `build_app` the Serve entry point."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.routing import Route

from actors import remote
from cave.errors import InvalidArgumentError, ServiceUnavailableError
from deployments.http.background import Upkeep
from deployments.http.body_limit import BodyLimitMiddleware, load_request_limits
from deployments.http.errors import RequestIdMiddleware, install_error_handlers
from deployments.http.isolation_metrics import IsolationMetrics
from deployments.http.logs import configure_logging
from deployments.http.mcp import build_mcp_app
from deployments.http.metrics import ApiMetrics, install_metrics
from deployments.http.routes import exec as exec_routes
from deployments.http.routes import files, health, keys, llm, namespaces, sandboxes
from deployments.http.services import Services
from deployments.http.tracing import install_tracing, load_sampling_rate, setup_tracing
from deployments.llm.engine import engine_apps
from deployments.schemas import CreateSandboxRequest, ExecRequest
from inference.registry import ModelRegistry, ModelSpec

log = logging.getLogger("cave.api")
REQUEST_BODIES: dict[str, type[BaseModel]] = {"create": CreateSandboxRequest, "run": ExecRequest}
# SandboxManager methods that Ray handles may call: each checks the key's scope itself.
HANDLE_METHODS = frozenset(
    {
        "create",
        "get",
        "list",
        "start",
        "stop",
        "delete",
        "run",
        "write_file",
        "read_file",
        "list_files",
        "delete_file",
    }
)
API_VERSION = "0.1.0"
APP_NAME = "cave"


# The chat gateway calls engines through Serve handles from this replica's event loop: their
# router on that loop saves two thread hops per streamed chunk (Serve's default runs it on a
# loop of its own). bench/llm_gateway.py measures the difference.
REPLICA_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def create_api(
    env: Mapping[str, str] | None = None,
    replica: str = "",
    engines: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The app; its services start with it (lifespan) from `env` over os.environ. `engines`:
    model id -> Serve handle of its ModelEngine deployment."""
    metrics = ApiMetrics()
    merged_env = {**os.environ, **(env or {})}
    limits = load_request_limits(merged_env)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.start(env, replica, engines)
        app.state.services = services
        metrics.set_sandbox_counter(services.sandboxes.count_by_state)
        metrics.set_node_counter(partial(remote.node_load, services.sandboxes.settings))
        IsolationMetrics(metrics, services.sandboxes)
        services.sandboxes.exec_observer = metrics.observe_exec
        metrics.set_revocation_age(services.llm.revocations.age_s)
        services.sandboxes.inline_output_bytes = limits.exec_output_bytes
        upkeep = Upkeep(services)
        upkeep.start()
        # The MCP app needs the services, so it joins the routes here, before any request.
        # A Route, not a Mount: a Mount would redirect /mcp to /mcp/.
        mcp_app, mcp_lifespan = build_mcp_app(
            services.sandboxes, services.authenticate, limits.mcp_bytes
        )
        app.router.routes.append(Route("/mcp", mcp_app))
        try:
            async with mcp_lifespan():
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
    for module in (sandboxes, exec_routes, files, keys, llm, namespaces, health):
        app.include_router(module.router)
    # Inside the metrics (a 413 is timed and counted), outside routing and authentication.
    app.add_middleware(BodyLimitMiddleware, limits=limits, on_reject=metrics.count_error)
    install_metrics(app, metrics)
    install_tracing(app, setup_tracing("cave-api", load_sampling_rate(merged_env), env=merged_env))
    app.add_middleware(RequestIdMiddleware)  # outermost: every response and log line has an id
    return app


@serve.deployment(
    name="ApiIngress",
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}},
    max_ongoing_requests=256,
    health_check_period_s=5,
)
@serve.ingress()
class ApiIngress:
    """One API replica. Settings come as an environment mapping (the deployment's args) laid
    over the replica's own environment, so that `serve run` and `cave up` configure it alike."""

    def __init__(
        self, env: Mapping[str, str] | None = None, engines: Mapping[str, Any] | None = None
    ) -> None:
        self._env = dict(env or {})
        self._engines = dict(engines or {})  # model id -> DeploymentHandle (Serve resolved them)
        configure_logging()
        context = serve.get_replica_context()
        self._replica = context.replica_tag if context is not None else ""
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self._app = create_api(self._env, _file_safe(self._replica), self._engines)
        return self._app

    async def call(self, api_key: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """A sandbox operation for Python code in the cluster (cave.client.ray_client), with the
        same key, scopes and audit as over HTTP; CaveErrors come back as themselves."""
        if method not in HANDLE_METHODS:
            raise InvalidArgumentError(
                f"unknown method {method!r}; known: {sorted(HANDLE_METHODS)}"
            )
        services = self._services()
        principal = await services.authenticate(f"Bearer {api_key}")
        if method in REQUEST_BODIES:  # plain dicts in, so callers need not import our schemas
            try:
                args = (*args[:-1], REQUEST_BODIES[method].model_validate(args[-1]))
            except ValidationError as exc:
                raise InvalidArgumentError(str(exc)) from None
        result = await getattr(services.sandboxes, method)(principal, *args, **kwargs)
        return result.model_dump(mode="json") if isinstance(result, BaseModel) else result

    async def actor_of(self, api_key: str, sandbox_id: str) -> Any:
        """The running sandbox's actor handle, for direct calls (no per-exec record or audit)."""
        services = self._services()
        principal = await services.authenticate(f"Bearer {api_key}")
        await services.sandboxes.ensure_running(principal, sandbox_id)
        return services.sandboxes.live[sandbox_id].actor

    def _services(self) -> Services:
        if self._app is None or not hasattr(self._app.state, "services"):
            raise ServiceUnavailableError("this replica has not finished starting")
        services: Services = self._app.state.services
        return services


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run deployments.http.app:build_app env.BKG_DB_PATH=...` or a config file's `args`:
    `{"env": {...}, "num_replicas": N, "autoscaling": {...}, "models": [...]}`; anything else is
    an error, not ignored. `autoscaling`: Serve's autoscaling_config for the API replicas (and so
    the chat gateway in them). Each model becomes a ModelEngine deployment of the same app."""
    known = {"env", "num_replicas", "autoscaling", "models"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown build_app args {unknown}; known: {sorted(known)}")
    env = {str(k): str(v) for k, v in dict(args.get("env") or {}).items()}
    deployment: Any = ApiIngress  # serve.deployment made it a Deployment; its stubs can't say
    if "num_replicas" in args and "autoscaling" in args:
        raise ValueError("give num_replicas or autoscaling, not both")
    if "num_replicas" in args:
        deployment = deployment.options(num_replicas=int(args["num_replicas"]))
    if args.get("autoscaling"):
        deployment = deployment.options(autoscaling_config=dict(args["autoscaling"]))
    return deployment.bind(env, engine_apps(_model_specs(args, env)))


def _model_specs(args: Mapping[str, Any], env: Mapping[str, str]) -> list[ModelSpec]:
    """`args["models"]` (ModelSpec dicts) if given, else the registry file (CAVE_MODELS_FILE)."""
    if "models" in args:
        return [ModelSpec.from_dict(spec) for spec in args["models"] or []]
    return ModelRegistry.from_env({**os.environ, **env}).specs()


def _file_safe(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in tag)
