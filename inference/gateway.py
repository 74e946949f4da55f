"""The chat path: verify the model-access key, pick the engine, stream deltas, meter use.

`ChatGateway.open` is the one call of a request: it checks the key, finds who serves the model
and counts the request against the key's rate limits, all before the first token; the
`ChatStream` it returns yields the engine's deltas and records the usage when closed.

Nothing here touches the database before the first token: the key is checked against the
signing keys and the revocation set held in memory, and the usage record is written after the
stream ends, by the `UsageRecorder` given (the replica's batch, deployments/sandboxes/
exec_records.py). A model no local engine serves goes to a peer cluster (inference/peers.py)
with the caller's own key. The local engines are the models file's (fixed for the replica's
life) and the admin API's (`set_registered`, kept current by deployments/llm/services.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Protocol

from cave.audit.event import AuditEvent, Outcome
from cave.auth.bearer import bearer_token
from cave.db import UsageEventRow, new_id
from cave.errors import (
    AuthError,
    ConfigError,
    InferenceUnavailableError,
    NotFoundError,
    RateLimitedError,
)
from inference.openai_chat import ChatCompletionIn, engine_request
from inference.peers import PeerRouter, names_unknown_key

CHAT_SCOPE = "llm:chat"
FORWARDED_KEYS = 4096  # keys held between authorize and stream for requests bound to a peer
REMOVED_MODELS = 4096  # ids of deleted models remembered, so that their callers get a 404


class UsageRecorder(Protocol):
    """Where audit events and usage rows go (deployments' ExecRecorder: batched writes)."""

    async def record(self, event: AuditEvent, row: UsageEventRow | None = None) -> None: ...


ModelFinder = Callable[[str], Awaitable[None]]  # looks again for a model not served here


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: int | None = None
    duration_ms: int = 0
    finish_reason: str = "stop"
    served_by: str | None = None  # "peer:<name>" when a peer served it; None: this gateway
    peer_failures: list[str] | None = None  # peers tried first, and why they could not serve


class ChatGateway:
    """One replica's chat path. `engines` maps a model id to a Serve handle of a ModelEngine:
    the models file's, given at start, and those added through the admin API."""

    def __init__(
        self,
        verifier: Any,
        recorder: UsageRecorder,
        engines: Mapping[str, Any],
        served_by: str = "local",
        limiter: Any = None,
        rpm: int = 0,
        tpm: int = 0,
        peers: PeerRouter | None = None,
        issuer: str = "cave",
    ) -> None:
        """`limiter`: an actors.rate_limiter.SharedRateLimiter, counting each key's requests and
        tokens per minute across replicas; `rpm`/`tpm` (0: no limit) bound keys whose token
        names no limits of its own. Without a limiter nothing is counted (tests of other parts).
        `peers`: where models not served here go; `issuer`: this cluster's CAVE_LLM_ISSUER."""
        self.verifier = verifier  # inference.tokens.TokenVerifier
        self.recorder = recorder
        self._static = dict(engines)  # the models file's: never replaced or removed
        self.engines = dict(engines)
        # One streaming handle per model, made once: `options()` builds a new handle each call.
        self._streams = {model: h.options(stream=True) for model, h in self.engines.items()}
        self._removed: dict[str, None] = {}  # deleted through the API (ordered: oldest first)
        self.served_by = served_by
        self.limiter = limiter
        self.rpm, self.tpm = rpm, tpm
        self.peers = peers
        self.issuer = issuer
        # Set by whoever keeps the admin API's models (deployments/llm/services.py): a model
        # added on another replica a moment ago is looked for before the request is refused.
        self.find_model: ModelFinder | None = None
        # `_stream` gets the claims only; a forwarded request needs the key itself.
        self._forwarded: dict[str, str] = {}
        if (rpm or tpm) and limiter is None:
            raise ConfigError("a rate limit is set (CAVE_LLM_RPM/TPM) but no limiter is given")

    async def open(
        self, authorization: str | None, namespace: str | None, body: ChatCompletionIn
    ) -> ChatStream:
        """The chat of `body`, admitted: AuthError (401) / ForbiddenError,
        NamespaceMismatchError (403) for the key; NotFoundError (404) for a model deleted
        through the admin API, InferenceUnavailableError (503) for one nobody serves;
        RateLimitedError (429) when the key's minute is spent. No token is made before this."""
        claims = self._authorize(authorization, namespace, body.model)
        if self.find_model is not None:
            await self.find_model(body.model)
        self._engine_for(body.model)
        await self._admit(claims, body.model)
        return ChatStream(self, claims, body)

    def limits(self, claims: Any) -> tuple[int, int]:
        """(rpm, tpm) of a key: those signed into it, else this gateway's defaults."""
        rpm = self.rpm if claims.rpm is None else claims.rpm
        tpm = self.tpm if claims.tpm is None else claims.tpm
        return rpm, tpm

    def set_registered(self, handles: Mapping[str, Any]) -> None:
        """The engines of the models added through the admin API (model id -> handle), in place
        of the last set. A models-file model keeps its own engine; a model that leaves the set
        is remembered as removed, so that a request for it is a 404 rather than a 503."""
        added = {m: h for m, h in handles.items() if m not in self._static}
        for model in set(self.engines) - set(self._static) - set(added):
            self._removed[model] = None
            if len(self._removed) > REMOVED_MODELS:
                del self._removed[next(iter(self._removed))]
        for model in added:
            self._removed.pop(model, None)
        self.engines = {**added, **self._static}
        self._streams = {
            m: self._streams.get(m) or h.options(stream=True) for m, h in self.engines.items()
        }

    def is_static(self, model: str) -> bool:
        """Whether `model` comes from the models file (read-only over the API)."""
        return model in self._static

    async def registry(self) -> dict[str, list[dict[str, Any]]]:
        """Each models-file model and peer model, and where it is served: the local engine (its
        kind), and the peers that list it (with their health). The admin API's models are
        listed by deployments/llm/services.py, which knows their Serve status."""
        served: dict[str, list[dict[str, Any]]] = {}
        for model, handle in self._static.items():
            info = await handle.info.remote()
            served.setdefault(model, []).append(
                {"kind": "local", "name": "local", "engine": info.get("engine"), "healthy": True}
            )
        for peer in self.peers.peers if self.peers is not None else ():
            for model in peer.models:
                healthy = self.peers.health.healthy(peer.name)  # type: ignore[union-attr]
                served.setdefault(model, []).append(
                    {"kind": "peer", "name": peer.name, "healthy": healthy}
                )
        return served

    def models(self) -> list[str]:
        peered = self.peers.models() if self.peers is not None else set()
        return sorted(set(self.engines) | peered)

    def _authorize(self, authorization: str | None, namespace: str | None, model: str) -> Any:
        """The key's claims, or AuthError (401) / ForbiddenError, NamespaceMismatchError (403)."""
        token = bearer_token(authorization, "model-access key")
        try:
            claims = self.verifier.verify(token, namespace, model, CHAT_SCOPE)
        except AuthError as error:
            if self.peers is not None and names_unknown_key(error):
                self.peers.nudge()  # a peer's new key: its JWKS is fetched again, soon
            raise
        if model not in self.engines and self.peers is not None:
            if len(self._forwarded) >= FORWARDED_KEYS:
                del self._forwarded[next(iter(self._forwarded))]  # the oldest
            self._forwarded[claims.jti] = token
        return claims

    async def _admit(self, claims: Any, model: str) -> None:
        """Counts the request against the key's minute; RateLimitedError (429) when spent.
        A refusal is audited (outcome "denied"); it is no usage, so it writes no usage row."""
        rpm, tpm = self.limits(claims)
        if self.limiter is None or not (rpm or tpm):
            return
        refused = await self.limiter.acquire(claims.jti, rpm, tpm)
        if refused is None:
            return
        wait_s, requests, tokens = refused.retry_after_s, refused.requests, refused.tokens
        spent_tokens = bool(tpm) and tokens >= tpm and not (rpm and requests >= rpm)
        quota, limit, used = ("tpm", tpm, tokens) if spent_tokens else ("rpm", rpm, requests)
        details = {
            "reason": "rate_limited",
            "retry_after_s": wait_s,
            "quota": quota,
            "limit": limit,
        }
        await self.recorder.record(_chat_event(claims, model, "denied", details))
        what = "tokens" if quota == "tpm" else "requests"
        raise RateLimitedError(
            f"model-access key {claims.jti} used its {limit} {what} per minute ({quota}); "
            f"retry in {wait_s:.0f} s",
            wait_s,
            quota,
            limit,
            used,
        )

    def _engine_for(self, model: str) -> Any:
        """The local engine's handle; None when only peers serve `model` and one of them is
        healthy; NotFoundError (404) for a model deleted through the admin API, and
        InferenceUnavailableError (503) for any other model nobody can serve."""
        engine = self.engines.get(model)
        if engine is not None:
            return engine
        if self.peers is not None and self.peers.candidates(model):
            return None
        if model in self._removed:
            raise NotFoundError(f"model {model!r} was removed from the model registry")
        raise InferenceUnavailableError(f"no engine or healthy peer serves model {model!r}")

    async def _stream(
        self, claims: Any, body: ChatCompletionIn, usage: Usage
    ) -> AsyncGenerator[dict[str, Any], None]:
        """ChatDelta dicts from the engine or a peer; `usage` is filled in as they come."""
        engine = self._engine_for(body.model)
        deltas = self._local(engine, body) if engine is not None else self._remote(claims, body)
        started = time.perf_counter()
        async for delta in deltas:
            if usage.ttft_ms is None:
                usage.ttft_ms = round((time.perf_counter() - started) * 1000)
            if delta.get("finish_reason"):
                usage.finish_reason = str(delta["finish_reason"])
                usage.prompt_tokens = int(delta.get("prompt_tokens") or 0)
                usage.completion_tokens = int(delta.get("completion_tokens") or 0)
            usage.served_by = delta.pop("served_by", None) or usage.served_by
            usage.peer_failures = delta.pop("peer_failures", None) or usage.peer_failures
            yield delta
        usage.duration_ms = round((time.perf_counter() - started) * 1000)

    async def _local(self, engine: Any, body: ChatCompletionIn) -> AsyncIterator[dict[str, Any]]:
        request = engine_request(body)
        # The model may have been deleted since `open`: this request still uses its handle.
        streams = self._streams.get(body.model) or engine.options(stream=True)
        async for delta in streams.stream.remote(request):
            yield delta

    async def _remote(self, claims: Any, body: ChatCompletionIn) -> AsyncIterator[dict[str, Any]]:
        token = self._forwarded.get(claims.jti)
        if self.peers is None or token is None:
            raise InferenceUnavailableError(f"no engine serves model {body.model!r} here")
        payload = {
            **body.model_dump(mode="json", exclude_none=True),
            "stream": True,
            "stream_options": {"include_usage": True},  # the peer's usage is ours to record
        }
        async for name, delta in self.peers.stream(body.model, token, claims.cave_ns, payload):
            yield {**delta, "served_by": f"peer:{name}"}

    async def _record(self, claims: Any, model: str, usage: Usage, outcome: Outcome) -> None:
        tpm = self.limits(claims)[1]
        if self.limiter is not None and tpm:
            tokens = usage.prompt_tokens + usage.completion_tokens
            await self.limiter.add_tokens(claims.jti, tokens, tpm)
        details = {k: v for k, v in asdict(usage).items() if v is not None}
        if claims.iss != self.issuer:
            # A peer's key: its token row (the usage row's foreign key) lives in the peer's
            # database, so here the audit trail alone records the use.
            details["issuer"] = claims.iss
            await self.recorder.record(_chat_event(claims, model, outcome, details))
            return
        row = UsageEventRow(
            id=new_id(),
            token_id=claims.jti,
            namespace_id=claims.cave_ns,
            model_id=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_ms=usage.ttft_ms,
            duration_ms=usage.duration_ms,
            served_by=usage.served_by or self.served_by,
        )
        await self.recorder.record(_chat_event(claims, model, outcome, details), row)


class ChatStream:
    """One admitted chat: `async with` it, iterate it for ChatDelta dicts (`text`, and on the
    last one `finish_reason` and the token counts). Closing it records the usage once, with
    outcome "error" when the stream raised, else "ok" (a caller that stops early used what
    it got). `usage` is complete once the deltas are exhausted."""

    def __init__(self, gateway: ChatGateway, claims: Any, body: ChatCompletionIn) -> None:
        self.model = body.model
        self.usage = Usage()
        self._gateway, self._claims = gateway, claims
        self._deltas = gateway._stream(claims, body, self.usage)
        self._outcome: Outcome = "ok"
        self._closed = False

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._deltas.__anext__()
        except StopAsyncIteration:
            raise
        except Exception:
            self._outcome = "error"
            raise

    async def aclose(self) -> None:
        """Stop the engine's stream and record the usage; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        await self._deltas.aclose()
        await self._gateway._record(self._claims, self.model, self.usage, self._outcome)

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def _chat_event(claims: Any, model: str, outcome: Outcome, details: dict[str, Any]) -> AuditEvent:
    actor = f"model-key:{claims.jti}"
    return AuditEvent(actor, "llm.chat", model, outcome, claims.cave_ns, details)
