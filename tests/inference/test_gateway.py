"""The chat gateway without Ray: `open` refuses before any token, and a `ChatStream` records the
usage once, when closed, with outcome "error" when the stream failed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cave.audit.event import AuditEvent
from cave.db import UsageEventRow
from cave.errors import (
    AuthError,
    InferenceUnavailableError,
    NotFoundError,
    RateLimitedError,
    SandboxError,
)
from inference.gateway import ChatGateway
from inference.openai_chat import ChatCompletionIn

pytestmark = pytest.mark.anyio
MODEL = "tiny-chat"
BEARER = "Bearer the-key"


@dataclass
class Claims:
    jti: str = "key-1"
    cave_ns: str = "ns-a"
    iss: str = "cave"
    rpm: int | None = None
    tpm: int | None = None


class Verifier:
    def verify(self, token: str, namespace: str | None, model: str, scope: str) -> Claims:
        if token != "the-key":
            raise AuthError("unknown key")
        return Claims()


@dataclass
class Recorder:
    records: list[tuple[AuditEvent, UsageEventRow | None]] = field(default_factory=list)

    async def record(self, event: AuditEvent, row: UsageEventRow | None = None) -> None:
        self.records.append((event, row))


class Engine:
    """A ModelEngine's handle, as far as the gateway uses it."""

    def __init__(self, deltas: list[dict[str, Any]], fail_after: int | None = None) -> None:
        self.deltas, self.fail_after, self.requests = deltas, fail_after, 0
        self.stream = self

    def options(self, stream: bool) -> Engine:
        return self

    async def _deltas(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.requests += 1
        for index, delta in enumerate(self.deltas):
            if index == self.fail_after:
                raise SandboxError("the engine's replica died")
            yield dict(delta)

    def remote(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._deltas(request)


@dataclass
class Refused:
    retry_after_s: float = 30.0
    requests: int = 1
    tokens: int = 0


class Limiter:
    def __init__(self, refuse: bool) -> None:
        self.refuse, self.added = refuse, 0

    async def acquire(self, key: str, rpm: int, tpm: int) -> Refused | None:
        return Refused() if self.refuse else None

    async def add_tokens(self, key: str, tokens: int, tpm: int) -> None:
        self.added += tokens


ANSWER = [
    {"text": "Hel"},
    {"text": "lo", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 2},
]


def body(model: str = MODEL) -> ChatCompletionIn:
    return ChatCompletionIn.model_validate(
        {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )


def gateway(engine: Engine, recorder: Recorder, **kwargs: Any) -> ChatGateway:
    return ChatGateway(Verifier(), recorder, {MODEL: engine}, **kwargs)


async def test_a_chat_streams_its_deltas_and_records_its_usage_once_on_close() -> None:
    recorder = Recorder()
    chat = await gateway(Engine(ANSWER), recorder).open(BEARER, "ns-a", body())
    async with chat:
        texts = [delta["text"] async for delta in chat]
    await chat.aclose()  # a second close records nothing more
    assert texts == ["Hel", "lo"]
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (5, 2)
    ((event, row),) = recorder.records
    assert (event.action, event.outcome, event.actor) == ("llm.chat", "ok", "model-key:key-1")
    assert row is not None and (row.token_id, row.completion_tokens, row.served_by) == (
        "key-1",
        2,
        "local",
    )


async def test_a_stream_that_fails_is_recorded_with_outcome_error() -> None:
    recorder = Recorder()
    chat = await gateway(Engine(ANSWER, fail_after=1), recorder).open(BEARER, "ns-a", body())
    with pytest.raises(SandboxError):
        async with chat:
            async for _ in chat:
                pass
    ((event, _),) = recorder.records
    assert event.outcome == "error"


async def test_a_caller_that_stops_early_records_what_it_got() -> None:
    recorder = Recorder()
    chat = await gateway(Engine(ANSWER), recorder).open(BEARER, "ns-a", body())
    async with chat:
        async for _ in chat:
            break
    ((event, _),) = recorder.records
    assert event.outcome == "ok"


@pytest.mark.parametrize("authorization", [None, "Basic x", "Bearer another-key"])
async def test_a_missing_or_bad_key_is_refused_before_the_engine(authorization: str | None) -> None:
    engine, recorder = Engine(ANSWER), Recorder()
    with pytest.raises(AuthError):
        await gateway(engine, recorder).open(authorization, "ns-a", body())
    assert engine.requests == 0 and recorder.records == []


async def test_an_unknown_model_is_looked_for_then_refused_and_a_deleted_one_is_a_404() -> None:
    engine, recorder = Engine(ANSWER), Recorder()
    chat_gateway = gateway(engine, recorder)
    looked_for: list[str] = []

    async def find(model: str) -> None:
        looked_for.append(model)

    chat_gateway.find_model = find
    with pytest.raises(InferenceUnavailableError):
        await chat_gateway.open(BEARER, "ns-a", body("nobody-serves-this"))
    assert looked_for == ["nobody-serves-this"]
    chat_gateway.set_registered({"added": Engine(ANSWER)})
    chat_gateway.set_registered({})  # deleted through the admin API
    with pytest.raises(NotFoundError):
        await chat_gateway.open(BEARER, "ns-a", body("added"))
    assert engine.requests == 0 and recorder.records == []


async def test_a_spent_minute_is_a_429_before_streaming_and_is_audited_as_denied() -> None:
    engine, recorder = Engine(ANSWER), Recorder()
    chat_gateway = gateway(engine, recorder, limiter=Limiter(refuse=True), rpm=1)
    with pytest.raises(RateLimitedError):
        await chat_gateway.open(BEARER, "ns-a", body())
    ((event, row),) = recorder.records
    assert (event.outcome, event.details["quota"], row) == ("denied", "rpm", None)
    assert engine.requests == 0


async def test_the_tokens_of_a_chat_count_against_the_key_s_minute() -> None:
    limiter = Limiter(refuse=False)
    chat_gateway = gateway(Engine(ANSWER), Recorder(), limiter=limiter, tpm=1000)
    async with await chat_gateway.open(BEARER, "ns-a", body()) as chat:
        async for _ in chat:
            pass
    assert limiter.added == 7
