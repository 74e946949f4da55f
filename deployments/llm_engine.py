"""Serve deployments of the chat engines: one `ModelEngine` per model, one handle interface.

Every engine kind answers `handle.options(stream=True).stream.remote(request_dict)` with
ChatDelta dicts (the last one with finish_reason and token counts) and `info()`, so the gateway
routes to a CPU model and to a vLLM model the same way. A vLLM model is two deployments: Ray
Serve LLM's `LLMServer` on GPU nodes and a `ModelEngine` adapter in front of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ray import serve

from cave.errors import ConfigError
from inference.engine import ChatEngine, delta_to_dict, request_from_dict
from inference.registry import ModelSpec

ENGINE_APP_NAME = "cave-llm"
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

        return CpuEngine(Path(spec.source), spec.model_id)
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
    """The Serve deployment of a model: serve.get_deployment_handle(this, ENGINE_APP_NAME)."""
    return f"ModelEngine:{model_id}"


def engine_apps(specs: Iterable[ModelSpec]) -> dict[str, serve.Application]:
    """A bound ModelEngine per model id, to bind into another deployment (it gets handles)."""
    return {spec.model_id: _engine_app(spec) for spec in specs}


def build_engine_app(specs: Iterable[ModelSpec]) -> serve.Application:
    """Every model of `specs` as a ModelEngine deployment, with an EngineCatalog as ingress."""
    return EngineCatalog.bind(engine_apps(specs))  # type: ignore[attr-defined]


def _engine_app(spec: ModelSpec) -> serve.Application:
    options = dict(_CPU_OPTIONS if spec.engine == "cpu" else _ADAPTER_OPTIONS)
    options["name"] = engine_deployment_name(spec.model_id)
    options.update(_replicas(spec))
    deployment = ModelEngine.options(**options)  # type: ignore[attr-defined]
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
