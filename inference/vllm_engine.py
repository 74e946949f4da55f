"""vLLM on GPU nodes through Ray Serve LLM, and the ChatEngine adapter over its Serve handle.

Ray Serve LLM (`ray.serve.llm`) imports pyarrow and vLLM, which come with the `cave[vllm]`
extra and are absent on CPU-only installs: they are imported inside the functions that need
them, and the configuration is built as a plain dict first so that it can be checked anywhere.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ray.exceptions import RayError

from cave.errors import InferenceUnavailableError
from inference.engine import FINISH_REASONS, ChatDelta, ChatRequest, validate_request
from inference.registry import ModelSpec


def vllm_llm_config_dict(model: ModelSpec) -> dict[str, Any]:
    """The keyword arguments of `ray.serve.llm.LLMConfig` that serve `model` on GPU nodes."""
    engine_kwargs: dict[str, Any] = {"tensor_parallel_size": model.tensor_parallel_size}
    if model.max_model_len is not None:
        engine_kwargs["max_model_len"] = model.max_model_len
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": model.model_id, "model_source": model.source},
        "llm_engine": "vLLM",
        "engine_kwargs": engine_kwargs,
        # One GPU per tensor-parallel worker: only nodes with GPUs can hold these bundles (Ray
        # Serve LLM adds `accelerator_type:<type>` to each when accelerator_type is set).
        # STRICT_PACK keeps a replica's workers on one node, where the GPUs share a fast link.
        "placement_group_config": {
            "bundle_per_worker": {"GPU": 1, "CPU": 1},
            "strategy": "STRICT_PACK",
        },
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": model.min_replicas,
                "max_replicas": model.max_replicas,
            }
        },
    }
    if model.accelerator_type is not None:
        config["accelerator_type"] = model.accelerator_type
    return config


def vllm_llm_config(model: ModelSpec) -> Any:
    """`ray.serve.llm.LLMConfig` for `model` (needs the `cave[vllm]` extra)."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(**vllm_llm_config_dict(model))


def openai_chat_request(request: ChatRequest) -> dict[str, Any]:
    """OpenAI's chat-completions body for `request`, streamed with a final usage chunk."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    return body


def sse_events(item: Any) -> Iterator[dict[str, Any]]:
    """The JSON events in one item of Ray Serve LLM's chat stream ("data: {...}\\n\\n" strings)."""
    if not isinstance(item, str):  # vLLM's ErrorResponse, sent instead of a stream
        raise InferenceUnavailableError(f"the vLLM engine answered with an error: {item!r}")
    for line in item.splitlines():
        payload = line.removeprefix("data:").strip()
        if not line.startswith("data:") or payload == "[DONE]":
            continue
        event = json.loads(payload)
        if "error" in event:
            raise InferenceUnavailableError(f"the vLLM engine failed: {event['error']}")
        yield event


class OpenAIStreamReader:
    """Turns OpenAI chat-completion chunks into ChatDeltas.

    The finish reason and the usage arrive in different chunks (the usage last, with no
    choices), so the last ChatDelta is built by `final()` once the stream has ended."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}

    def feed(self, chunk: dict[str, Any]) -> ChatDelta | None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return ChatDelta(text=text) if text else None

    def final(self) -> ChatDelta:
        if self.finish_reason not in FINISH_REASONS:
            raise InferenceUnavailableError(
                f"the vLLM stream ended with finish_reason {self.finish_reason!r}"
            )
        return ChatDelta(
            text="",
            finish_reason=self.finish_reason,
            prompt_tokens=self.usage.get("prompt_tokens"),
            completion_tokens=self.usage.get("completion_tokens"),
        )


class VllmChatEngine:
    """A ChatEngine over the Serve handle of a Ray Serve LLM deployment (`LLMServer`)."""

    kind = "vllm"

    def __init__(
        self,
        model_id: str,
        llm_server: Any,
        request_type: Callable[..., Any] | None = None,
    ) -> None:
        """`llm_server`: a DeploymentHandle of `build_llm_deployment`'s app. `request_type`
        builds the request object it takes; by default vLLM's ChatCompletionRequest."""
        self.model_id = model_id
        self._server = llm_server
        self._request_type = request_type

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        validate_request(request)
        body = self._make_request(openai_chat_request(request))
        reader = OpenAIStreamReader()
        try:
            async for batch in self._server.options(stream=True).chat.remote(body):
                # LLMServer batches streamed chunks: each item is a list of SSE strings.
                for item in batch if isinstance(batch, list) else [batch]:
                    for event in sse_events(item):
                        delta = reader.feed(event)
                        if delta is not None:
                            yield delta
        except (json.JSONDecodeError, RayError) as exc:
            raise InferenceUnavailableError(f"vLLM model {self.model_id!r}: {exc}") from exc
        yield reader.final()

    def _make_request(self, body: dict[str, Any]) -> Any:
        if self._request_type is not None:
            return self._request_type(**body)
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        return ChatCompletionRequest(**body)
