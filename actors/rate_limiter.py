"""Per-key request and token budgets shared by every gateway replica: one small named actor.

`RateLimitService` is the plain logic (a fixed one-minute window per model-access key, `jti`);
`RateLimiter` is its Ray actor, named so that every replica of every gateway app finds the same
one; `SharedRateLimiter` is what a replica holds: it calls the actor and turns Ray's failures
into CaveErrors at this boundary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from cave.errors import ServiceUnavailableError

log = logging.getLogger("cave.llm")
LIMITER_NAME = "cave-llm-limiter"
NAMESPACE = "cave"
WINDOW_S = 60.0
SWEEP_EVERY = 1024  # acquires between sweeps of expired windows: memory stays bounded


@dataclass
class _Window:
    started: float
    requests: int = 0
    tokens: int = 0


class RateLimitService:
    """Requests and tokens per key in fixed one-minute windows; a window starts at a key's first
    request after the previous one ended. `clock` is monotonic seconds (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._calls = 0

    def acquire(self, jti: str, rpm: int, tpm: int) -> float | None:
        """Counts one request of `jti` and returns None, or returns the seconds until the window
        ends when `rpm` requests were made or `tpm` tokens used in it (0: no such limit)."""
        now = self._clock()
        self._sweep(now)
        window = self._window(jti, now)
        if (rpm and window.requests >= rpm) or (tpm and window.tokens >= tpm):
            return max(window.started + WINDOW_S - now, 0.0)
        window.requests += 1
        return None

    def add_tokens(self, jti: str, tokens: int) -> None:
        """Tokens a finished request of `jti` used; they count against the current window."""
        if tokens > 0:
            self._window(jti, self._clock()).tokens += tokens

    def usage(self, jti: str) -> tuple[int, int]:
        """(requests, tokens) of `jti` in its current window."""
        window = self._window(jti, self._clock())
        return window.requests, window.tokens

    def _window(self, jti: str, now: float) -> _Window:
        window = self._windows.get(jti)
        if window is None or now - window.started >= WINDOW_S:
            window = self._windows[jti] = _Window(now)
        return window

    def _sweep(self, now: float) -> None:
        self._calls += 1
        if self._calls % SWEEP_EVERY == 0:
            ended = [k for k, w in self._windows.items() if now - w.started >= WINDOW_S]
            for jti in ended:
                del self._windows[jti]


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimiter:
    """The cluster's one RateLimitService. Async methods: one event loop, calls never overlap
    inside a method, so the counts need no lock. A restart forgets the counts (a fresh window)."""

    def __init__(self) -> None:
        self.service = RateLimitService()

    async def acquire(self, jti: str, rpm: int, tpm: int) -> float | None:
        return self.service.acquire(jti, rpm, tpm)

    async def add_tokens(self, jti: str, tokens: int) -> None:
        self.service.add_tokens(jti, tokens)

    async def usage(self, jti: str) -> tuple[int, int]:
        return self.service.usage(jti)


def rate_limiter() -> ActorHandle:
    """The cluster's limiter actor, created by whoever asks first."""
    # cast: Ray's stubs type `.remote()` on an actor class as handle-or-class.
    return cast(
        ActorHandle,
        RateLimiter.options(  # type: ignore[attr-defined]
            name=LIMITER_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(),
    )


class SharedRateLimiter:
    """A replica's view of the limiter actor; Ray failures become ServiceUnavailableError."""

    def __init__(self, actor: ActorHandle | None = None) -> None:
        self._actor: Any = actor if actor is not None else rate_limiter()

    async def acquire(self, jti: str, rpm: int, tpm: int) -> float | None:
        """None when the request may go on, else the seconds to wait (at least 1, whole)."""
        try:
            wait_s = await self._actor.acquire.remote(jti, rpm, tpm)
        except RayActorError as exc:
            raise ServiceUnavailableError(f"the rate limiter is unavailable: {exc}") from None
        return None if wait_s is None else float(max(1, math.ceil(wait_s)))

    async def usage(self, jti: str) -> tuple[int, int]:
        """(requests, tokens) of `jti` in its current window."""
        try:
            requests, tokens = await self._actor.usage.remote(jti)
        except RayActorError as exc:
            raise ServiceUnavailableError(f"the rate limiter is unavailable: {exc}") from None
        return int(requests), int(tokens)

    async def add_tokens(self, jti: str, tokens: int) -> None:
        """Counts tokens already served: a failure is logged, never the caller's error."""
        try:
            await self._actor.add_tokens.remote(jti, tokens)
        except RayActorError:
            log.exception("cannot count %d tokens of key %s", tokens, jti)
