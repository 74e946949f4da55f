"""The vLLM path without a GPU: the LLMConfig it asks Ray Serve LLM for, the OpenAI shapes it
speaks, and the ModelEngine adapter over a Serve handle that streams like LLMServer.chat."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from ray import serve

from cave.errors import InferenceUnavailableError
from deployments.llm.engine import ModelEngine, engine_deployment_name
from inference.engine import ChatDelta, ChatMessage, ChatRequest
from inference.registry import ModelSpec
from inference.vllm_engine import (
    OpenAIStreamReader,
    openai_chat_request,
    sse_events,
    vllm_llm_config_dict,
)

APP = "vllm-adapter-test"
MODEL = "qwen-7b"


def test_the_config_asks_for_gpus_of_the_named_type() -> None:
    spec = ModelSpec(
        model_id=MODEL,
        engine="vllm",
        source="Qwen/Qwen2.5-7B-Instruct",
        accelerator_type="H100",
        tensor_parallel_size=2,
        max_model_len=8192,
        min_replicas=1,
        max_replicas=4,
    )
    config = vllm_llm_config_dict(spec)

    assert config["model_loading_config"] == {
        "model_id": MODEL,
        "model_source": "Qwen/Qwen2.5-7B-Instruct",
    }
    assert config["accelerator_type"] == "H100"
    # One GPU bundle per tensor-parallel worker, all on one node: only GPU nodes can hold them.
    assert config["placement_group_config"]["bundle_per_worker"]["GPU"] == 1
    assert config["placement_group_config"]["strategy"] == "STRICT_PACK"
    assert config["engine_kwargs"] == {"tensor_parallel_size": 2, "max_model_len": 8192}
    assert config["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
    }


def test_without_an_accelerator_type_any_gpu_node_will_do() -> None:
    config = vllm_llm_config_dict(ModelSpec(MODEL, "vllm", "/srv/models/qwen"))

    assert "accelerator_type" not in config
    assert config["placement_group_config"]["bundle_per_worker"]["GPU"] == 1
    assert config["engine_kwargs"] == {"tensor_parallel_size": 1}


def test_a_request_becomes_a_streaming_openai_body() -> None:
    request = ChatRequest(
        MODEL, [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], 64, 0.0, 0.9
    )
    assert openai_chat_request(request) == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 64,
        "temperature": 0.0,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request.stop, request.seed = ["\n\n"], 11
    body = openai_chat_request(request)
    assert body["stop"] == ["\n\n"] and body["seed"] == 11


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """A chat.completion.chunk as vLLM's OpenAI server writes it."""
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    return {**base, "choices": [choice], "usage": None, **extra}


def stream_chunks(text: str, finish: str = "stop") -> Iterator[dict[str, Any]]:
    yield chunk("", role="assistant")
    for start in range(0, len(text), 16):
        yield chunk(text[start : start + 16])
    yield chunk("", finish)
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    yield {**chunk(), "choices": [], "usage": usage}


def test_openai_chunks_become_deltas_and_a_final_one_with_usage() -> None:
    reader = OpenAIStreamReader()
    deltas = [d for c in stream_chunks("Hello, world! How are you?") if (d := reader.feed(c))]

    assert [d.text for d in deltas] == ["Hello, world! Ho", "w are you?"]
    assert reader.final() == ChatDelta("", "stop", prompt_tokens=9, completion_tokens=4)


def test_sse_items_are_parsed_and_errors_raised() -> None:
    item = "".join(f"data: {json.dumps(c)}\n\n" for c in stream_chunks("ok")) + "data: [DONE]\n\n"
    assert [e["choices"] for e in sse_events(item)][1] == chunk("ok")["choices"]
    with pytest.raises(InferenceUnavailableError, match="out of memory"):
        list(sse_events('data: {"error": {"message": "out of memory", "code": 500}}\n\n'))
    with pytest.raises(InferenceUnavailableError):
        list(sse_events({"object": "error", "message": "bad"}))  # an ErrorResponse, not a stream
    reader = OpenAIStreamReader()
    reader.feed(chunk("x", "abort"))
    with pytest.raises(InferenceUnavailableError, match="abort"):
        reader.final()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class LLMServerStandIn:
    """Stands in for Ray Serve LLM's LLMServer, which needs vLLM and a GPU: its `chat` streams
    what LLMServer.chat streams for a streaming request (lists of "data: {chunk}\\n\\n"
    strings). The answer is the request it received, as JSON; max_tokens=1 fails like vLLM."""

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[list[str]]:
        if request["max_tokens"] == 1:
            yield ['data: {"error": {"message": "engine dead", "code": 500}}\n\n']
            return
        events = [f"data: {json.dumps(c)}\n\n" for c in stream_chunks(json.dumps(request))]
        for start in range(0, len(events), 3):
            yield events[start : start + 3]
        yield ["data: [DONE]\n\n"]


@pytest.fixture(scope="module")
def vllm_engine(serve_for_handles: None) -> Iterator[Any]:
    spec = ModelSpec(MODEL, "vllm", "Qwen/Qwen2.5-7B-Instruct").to_dict()
    engine = ModelEngine.options(  # type: ignore[attr-defined]
        name=engine_deployment_name(MODEL), ray_actor_options={"num_cpus": 0}
    )
    # request_type=dict: the stand-in takes the OpenAI body as a dict, where vLLM's LLMServer
    # takes it as vLLM's ChatCompletionRequest (the default).
    llm_server = LLMServerStandIn.bind()  # type: ignore[attr-defined]
    handle = serve.run(engine.bind(spec, llm_server, dict), name=APP, route_prefix=None)
    yield handle
    serve.delete(APP)


def test_the_vllm_path_streams_through_the_same_handle_interface(vllm_engine: Any) -> None:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 32,
        "temperature": 0.0,
        "stop": ["END"],
        "seed": 5,
    }
    deltas = list(vllm_engine.options(stream=True).stream.remote(request))

    *pieces, last = deltas
    assert len(pieces) > 1 and all(p["finish_reason"] is None for p in pieces)
    assert last == {
        "text": "",
        "finish_reason": "stop",
        "prompt_tokens": 9,
        "completion_tokens": 4,
    }
    sent = json.loads("".join(p["text"] for p in pieces))  # what the vLLM server received
    assert sent == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["END"],
        "seed": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert vllm_engine.info.remote().result() == {"model_id": MODEL, "engine": "vllm"}


def test_an_engine_failure_reaches_the_caller_as_inference_unavailable(vllm_engine: Any) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with pytest.raises(InferenceUnavailableError, match="engine dead"):
        list(vllm_engine.options(stream=True).stream.remote(request))
