"""Serve deployments of the chat engines: one `ModelEngine` per model, one handle interface.

Every engine kind answers `handle.options(stream=True).stream.remote(request_dict)` with
ChatDelta dicts (the last one with finish_reason and token counts) and `info()`, so the gateway
routes to a CPU model and to a vLLM model the same way. A vLLM model is two deployments: Ray
Serve LLM's `LLMServer` on GPU nodes and a `ModelEngine` adapter in front of it.

A model added through the admin API is its own Serve application (`model_app_name`), deployed
and deleted from inside an API replica; the functions that talk to the Serve controller block,
so callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from cave.errors import ConfigError, InferenceUnavailableError
from inference.engine import ChatEngine, delta_to_dict, request_from_dict
from inference.registry import ModelSpec

MODEL_APP_PREFIX = "cave-model-"  # + the model id made safe: the Serve app of an API-added model
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# The vLLM adapter only relays chunks: many streams per replica, no CPU reserved.
_ADAPTER_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0},
    "max_ongoing_requests": 256,
}
# CPU torch uses every core of its node for one sequence; requests queue in the engine.
_CPU_OPTIONS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 16}


def make_engine(
    spec: ModelSpec, llm_server: Any = None, request_type: Callable[..., Any] | None = None
) -> ChatEngine:
    """The engine for `spec`; a vLLM model needs the handle of its LLMServer deployment."""
    if spec.engine == "cpu":
        from inference.cpu_engine import CpuEngine  # torch is imported only where it runs

        return CpuEngine(Path(spec.source), spec.model_id, use_gpu=spec.num_gpus > 0)
    if llm_server is None:
        raise ConfigError(f"model {spec.model_id!r}: a vLLM model needs its LLMServer handle")
    from inference.vllm_engine import VllmChatEngine

    return VllmChatEngine(spec.model_id, llm_server, request_type)


@serve.deployment
class ModelEngine:
    """One model behind the common handle interface, whatever engine serves it."""

    def __init__(
        self,
        spec: Mapping[str, Any],
        llm_server: Any = None,
        request_type: Callable[..., Any] | None = None,
    ) -> None:
        """`spec`: a ModelSpec dict ({"model_id", "engine", "source" or "path", ...}).
        `llm_server`, `request_type`: for vLLM, see `VllmChatEngine`."""
        self.spec = ModelSpec.from_dict(spec)
        self.engine = make_engine(self.spec, llm_server, request_type)
        self.requests = 0

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """ChatDelta dicts for a ChatRequest dict; a bad request raises InvalidArgumentError."""
        self.requests += 1
        async for delta in self.engine.stream(request_from_dict(request)):
            yield delta_to_dict(delta)

    def info(self) -> dict[str, str]:
        return {"model_id": self.spec.model_id, "engine": self.spec.engine}

    def requests_served(self) -> int:
        """Stream calls this replica has taken (tests check a refused key never gets here)."""
        return self.requests


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EngineCatalog:
    """The ingress of the engines' app: what is served here, and the handle of each model."""

    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines  # model id -> DeploymentHandle of its ModelEngine

    async def info(self) -> list[dict[str, str]]:
        return [await handle.info.remote() for handle in self.engines.values()]


def engine_deployment_name(model_id: str) -> str:
    """The Serve deployment of a model, in the API's app or in its own (`model_app_name`)."""
    return f"ModelEngine:{model_id}"


def engine_apps(specs: Iterable[ModelSpec]) -> dict[str, serve.Application]:
    """A bound ModelEngine per model id, to bind into another deployment (it gets handles)."""
    return {spec.model_id: _engine_app(spec) for spec in specs}


def build_engine_app(specs: Iterable[ModelSpec]) -> serve.Application:
    """Every model of `specs` as a ModelEngine deployment, with an EngineCatalog as ingress."""
    return EngineCatalog.bind(engine_apps(specs))  # type: ignore[attr-defined]


def engine_options(spec: ModelSpec) -> dict[str, Any]:
    """The Serve options of the model's ModelEngine deployment: its name, the resources of each
    replica (a cpu model with num_gpus > 0 asks Ray for that many GPUs, so only GPU nodes can
    hold it), and its replica count or autoscaling bounds."""
    options = copy.deepcopy(_CPU_OPTIONS if spec.engine == "cpu" else _ADAPTER_OPTIONS)
    options["name"] = engine_deployment_name(spec.model_id)
    if spec.engine == "cpu" and spec.num_gpus > 0:
        options["ray_actor_options"]["num_gpus"] = spec.num_gpus
    options.update(_replicas(spec))
    return options


def engine_deployment(spec: ModelSpec) -> serve.Deployment:
    """The model's ModelEngine deployment, not yet bound (`.ray_actor_options` and the other
    options can be read from it)."""
    return ModelEngine.options(**engine_options(spec))  # type: ignore[attr-defined,no-any-return]


def _engine_app(spec: ModelSpec) -> serve.Application:
    deployment = engine_deployment(spec)
    if spec.engine == "cpu":
        return deployment.bind(spec.to_dict())
    return deployment.bind(spec.to_dict(), _llm_server_app(spec))


def _replicas(spec: ModelSpec) -> dict[str, Any]:
    low = max(spec.min_replicas, 1) if spec.engine == "vllm" else spec.min_replicas
    if low == spec.max_replicas:
        return {"num_replicas": low}
    return {"autoscaling_config": {"min_replicas": low, "max_replicas": spec.max_replicas}}


def _llm_server_app(spec: ModelSpec) -> serve.Application:
    """Ray Serve LLM's vLLM deployment for `spec` (needs the `cave[vllm]` extra)."""
    from ray.serve.llm import build_llm_deployment

    from inference.vllm_engine import vllm_llm_config

    return build_llm_deployment(vllm_llm_config(spec), name_prefix=f"vLLM:{spec.model_id}:")


def model_app_name(model_id: str) -> str:
    """The Serve application of a model added through the admin API. Model ids may hold `/`
    and `:`; those become `-`, with a hash of the id so that `a/b` and `a:b` stay apart."""
    safe = _UNSAFE.sub("-", model_id)
    if safe != model_id:
        safe += "-" + hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return MODEL_APP_PREFIX + safe


def deploy_model_app(spec: ModelSpec) -> None:
    """Deploy (or update in place) the model's own Serve app, with no HTTP route; returns once
    the controller has it, not when its replicas are up. Blocks: run it in a thread."""
    target = serve.RunTarget(
        _engine_app(spec), name=model_app_name(spec.model_id), route_prefix=None
    )
    with _serve_errors(spec.model_id, "deploy"):
        serve.run_many([target], wait_for_applications_running=False)


def delete_model_app(model_id: str) -> None:
    """Delete the model's Serve app (nothing when there is none) and wait until it is gone, so
    that the same id may be deployed again at once. Blocks: run it in a thread."""
    with _serve_errors(model_id, "delete"):
        serve.delete(model_app_name(model_id))


def model_app_statuses() -> dict[str, tuple[str, str]]:
    """(status, message) of every Serve app of an API-added model, by app name; the status is
    Serve's: DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING. Blocks: run it in a thread."""
    with _serve_errors("*", "read the status of"):
        apps = serve.status().applications
    return {
        name: (str(getattr(app.status, "value", app.status)), app.message)
        for name, app in apps.items()
        if name.startswith(MODEL_APP_PREFIX)
    }


def model_handle(model_id: str) -> Any:
    """A handle of the model's ModelEngine in its own app; made locally (no controller call),
    it stays valid across redeploys and waits for replicas while the app starts."""
    return serve.get_deployment_handle(
        engine_deployment_name(model_id), model_app_name(model_id), _check_exists=False
    )


@contextlib.contextmanager
def _serve_errors(model_id: str, doing: str) -> Iterator[None]:
    """Serve's and Ray's errors become InferenceUnavailableError here, at the boundary."""
    try:
        yield
    except (RayServeException, RayError, TimeoutError) as exc:
        raise InferenceUnavailableError(
            f"cannot {doing} the Serve app of model {model_id!r}: {exc}"
        ) from exc
