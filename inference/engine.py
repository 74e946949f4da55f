"""The one interface every chat engine offers (CPU transformers, vLLM), and its request checks.

The gateway speaks only these types; across a Serve handle they travel as plain dicts
(the gateway sends inference/openai_chat.py's `engine_request`, read by `request_from_dict`;
`delta_to_dict` answers) so that a caller needs neither torch nor vLLM installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cave.errors import InvalidArgumentError

# OpenAI's roles; "developer" is its newer name for "system".
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
FINISH_REASONS = frozenset({"stop", "length"})
MAX_TOKENS_LIMIT = 32_768
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


@dataclass
class ChatMessage:
    role: str
    content: str


@dataclass
class ChatRequest:
    model: str
    messages: list[ChatMessage]
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # the same seed, request and model give the same text


@dataclass
class ChatDelta:
    """A piece of the answer; the last one has `finish_reason` and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@runtime_checkable
class ChatEngine(Protocol):
    model_id: str

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]: ...


def validate_request(request: ChatRequest, max_tokens_limit: int = MAX_TOKENS_LIMIT) -> None:
    """Raise InvalidArgumentError for a request no engine can serve."""
    if not request.messages:
        raise InvalidArgumentError("messages: at least one message is required")
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidArgumentError(
                f"messages[{index}].role: {message.role!r} is not one of {sorted(ROLES)}"
            )
    if not 1 <= request.max_tokens <= max_tokens_limit:
        raise InvalidArgumentError(f"max_tokens: must be between 1 and {max_tokens_limit}")
    if not 0.0 <= request.temperature <= 2.0:
        raise InvalidArgumentError("temperature: must be between 0 and 2")
    if not 0.0 < request.top_p <= 1.0:
        raise InvalidArgumentError("top_p: must be above 0 and at most 1")
    _validate_stop(request.stop)
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidArgumentError(f"seed: must be between 0 and {MAX_SEED}")


def _validate_stop(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgumentError(f"stop: at most {MAX_STOP_STRINGS} strings")
    if any(not text or len(text) > MAX_STOP_CHARS for text in stop):
        raise InvalidArgumentError(f"stop: each string must have 1 to {MAX_STOP_CHARS} characters")


def request_from_dict(data: Mapping[str, Any]) -> ChatRequest:
    """Build and validate a request from its dict form; wrong shapes raise InvalidArgumentError.

    A missing or null optional field takes its default, as in OpenAI's API."""
    try:
        messages = [
            ChatMessage(_typed(m["role"], str, "role"), _typed(m["content"], str, "content"))
            for m in data["messages"]
        ]
        request = ChatRequest(
            model=_typed(data["model"], str, "model"),
            messages=messages,
            max_tokens=_field(data, "max_tokens", int, 256),
            temperature=float(_field(data, "temperature", (int, float), 1.0)),
            top_p=float(_field(data, "top_p", (int, float), 1.0)),
            stop=[_typed(s, str, "stop") for s in _field(data, "stop", list, [])],
            seed=_field(data, "seed", int, None),
        )
    except (KeyError, TypeError) as exc:
        raise InvalidArgumentError(f"malformed chat request: missing or bad {exc}") from None
    validate_request(request)
    return request


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(name)
    return default if value is None else _typed(value, kind, name)


def _typed(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    # bool is an int in Python; a JSON `true` is never a token count or a seed.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgumentError(f"{name}: {value!r} has the wrong type")
    return value


def delta_to_dict(delta: ChatDelta) -> dict[str, Any]:
    return dataclasses.asdict(delta)
