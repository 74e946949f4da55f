"""Bodies of the model-access and OpenAI-compatible chat routes; the chat request is
inference/openai_chat.py's (the gateway reads it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config.llm import MAX_PER_MINUTE
from deployments.schemas import Namespace
from inference.gateway import Usage


class AccessRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=200)
    cave_namespace: Namespace
    scopes: list[Literal["llm:chat"]] | None = None
    ttl_s: float | None = Field(None, gt=0)
    reason: str = Field("", max_length=2000)
    rpm: int | None = Field(
        None,
        ge=1,
        le=MAX_PER_MINUTE,
        description="Requests per minute asked for (default: the deployment's CAVE_LLM_RPM)",
    )
    tpm: int | None = Field(
        None,
        ge=1,
        le=MAX_PER_MINUTE,
        description="Tokens (prompt + completion) per minute "
        "asked for (default: the deployment's CAVE_LLM_TPM)",
    )


class ApproveIn(BaseModel):
    """Limits the admin grants instead of those asked for; 0 is no limit."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=0, le=MAX_PER_MINUTE)
    tpm: int | None = Field(None, ge=0, le=MAX_PER_MINUTE)


class AccessRequestOut(BaseModel):
    id: str
    model_id: str
    cave_namespace: str
    scopes: list[str]
    ttl_s: int
    rpm: int | None = Field(
        description="Requests per minute: asked for while pending (null: the default), granted "
        "once approved (0: no limit)"
    )
    tpm: int | None = Field(description="Tokens per minute, as `rpm`")
    reason: str
    state: Literal["pending", "approved", "denied"]
    requested_by: str
    decided_by: str | None
    created_at: datetime
    decided_at: datetime | None


class AccessRequestList(BaseModel):
    items: list[AccessRequestOut]


class ApprovedOut(AccessRequestOut):
    model_access_key: str = Field(
        description="The signed key (a JWT): shown in this response only."
    )
    token_id: str
    expires_at: datetime


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_id: str = Field(min_length=1, max_length=64)


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cave"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ServedAt(BaseModel):
    kind: Literal["local", "peer"]
    name: str = Field(description="`local`, or the peer's name")
    engine: str | None = Field(None, description="cpu | vllm, for local engines")
    healthy: bool
    # Only models added through the API have these; the others' entries stay as they were.
    status: str | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description="For models added through the API: their Serve app's status (DEPLOYING, "
        "RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, NOT_STARTED)",
    )
    message: str | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description="Serve's explanation of that status, if any",
    )


class RegisteredModel(BaseModel):
    model_id: str
    origin: Literal["config", "api", "peer"] = Field(
        description="config: the models file (read-only over the API); api: added with PUT; "
        "peer: only peer clusters list it"
    )
    served_at: list[ServedAt]


class ModelRegistryOut(BaseModel):
    models: list[RegisteredModel]


class ModelSpecIn(BaseModel):
    """A model to register: every ModelSpec field but the id, which is in the path."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["cpu", "vllm"]
    source: str = Field(
        min_length=1,
        max_length=4096,
        description="cpu: an absolute path to a model directory (from_pretrained layout) on "
        "the nodes; vllm: a directory or a Hugging Face id",
    )
    accelerator_type: str | None = Field(
        None, max_length=64, description='vllm only: a Ray accelerator type ("H100", "L4", ...)'
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vllm only: GPUs per replica")
    max_model_len: int | None = Field(None, ge=1, le=10_000_000, description="vllm only")
    min_replicas: int = Field(1, ge=0, le=64)
    max_replicas: int = Field(1, ge=1, le=64)
    num_gpus: float = Field(
        0.0,
        ge=0,
        le=64,
        allow_inf_nan=False,
        description="cpu only: GPUs each replica reserves (fractions allowed); Ray places it on "
        "a node that has them and the engine runs on CUDA there",
    )


class ModelSpecOut(ModelSpecIn):
    model_id: str
    origin: Literal["api"] = "api"
    app: str = Field(description="The Serve application that serves it")


def chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    """One `chat.completion.chunk` of a streamed answer."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(completion_id: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    """The last chunk of a streamed answer (`stream_options.include_usage`): no choices."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_body(usage),
    }


def usage_body(usage: Usage) -> dict[str, int]:
    total = usage.prompt_tokens + usage.completion_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": total,
    }


def completion(
    completion_id: str, created: int, model: str, text: str, usage: Usage
) -> dict[str, Any]:
    """The `chat.completion` of an answer not streamed."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": usage.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_body(usage),
    }
