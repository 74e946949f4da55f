"""OpenAI's chat-completions request as this gateway takes it, and the engine request made of it.

The response bodies (chunks, completion, usage) are the HTTP layer's: deployments/llm/schemas.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cave.errors import InvalidArgumentError


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, object]] | None = ""


class StreamOptions(BaseModel):
    include_usage: bool = True


class ChatCompletionIn(BaseModel):
    """OpenAI's chat-completions request; fields this gateway does not know are ignored, as
    OpenAI-compatible servers do, and values it cannot honour (n > 1) are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")


def engine_request(body: ChatCompletionIn) -> dict[str, Any]:
    """The ChatRequest dict (inference/engine.py) a local engine streams for."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    return {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_completion_tokens or body.max_tokens or 256,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": stop,
        "seed": body.seed,
    }


def _text(content: str | list[dict[str, object]] | None) -> str:
    """Text content; of a list of parts (OpenAI's content parts) the text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidArgumentError("only text content parts are supported")
        texts.append(str(part.get("text", "")))
    return "".join(texts)
