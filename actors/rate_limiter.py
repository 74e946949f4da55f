"""Per-key request and token budgets shared by every gateway replica: one small named actor.

`RateLimitService` is the plain logic (a fixed one-minute window per model-access key, `jti`);
`RateLimiter` is its Ray actor, named so that every replica of every gateway app finds the same
one; `SharedRateLimiter` is what a replica holds: it calls the actor and turns Ray's failures
into CaveErrors at this boundary.
"""

from __future__ import annotations

import asyncio
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
# The actor is detached: it outlives a deploy of new code. Its name carries the version of its
# methods, so replicas of a new version never call an older actor that lacks them (the old one
# holds no CPU and is forgotten with its counts).
LIMITER_PROTOCOL = 2
LIMITER_NAME = f"cave-llm-limiter-v{LIMITER_PROTOCOL}"
NAMESPACE = "cave"
WINDOW_S = 60.0
SWEEP_EVERY = 1024  # acquires between sweeps of expired windows: memory stays bounded
LEASE_S = 2.0  # a replica's lease of a key's requests expires after this (or its window)
MAX_LEASE = 16  # requests one replica leases at once: what tokens may overshoot `tpm` by


@dataclass
class _Window:
    started: float
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Grant:
    """The answer to a lease: `granted` requests of the key's current window (0: refused), the
    seconds left in that window, the window's id (its start on the limiter's clock), and the
    requests (this grant included) and tokens counted in it."""

    granted: int
    window_left_s: float
    window: float
    requests: int
    tokens: int


class RateLimitService:
    """Requests and tokens per key in fixed one-minute windows; a window starts at a key's first
    request after the previous one ended. `clock` is monotonic seconds (injectable for tests).

    Replicas take requests in leases of several (`lease`), so that a busy key costs one call
    here per lease rather than per request; what a replica leased and did not use it gives back.
    The requests granted never exceed `rpm` in a window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._calls = 0
        self.leases = 0  # lease calls answered: how often replicas had to ask

    def lease(
        self, jti: str, rpm: int, tpm: int, want: int = 1, give_back: tuple[float, int] = (0, 0)
    ) -> Grant:
        """Up to `want` requests of `jti`'s window, none when `rpm` requests were granted or
        `tpm` tokens used in it (0: no such limit). `give_back`: (window, unused requests) of
        the caller's previous lease, returned first when that window is still the current one."""
        now = self._clock()
        self._sweep(now)
        self.leases += 1
        window = self._window(jti, now)
        if give_back[1] > 0 and give_back[0] == window.started:
            window.requests = max(0, window.requests - give_back[1])
        granted = 0
        if not ((rpm and window.requests >= rpm) or (tpm and window.tokens >= tpm)):
            granted = max(1, want) if not rpm else min(max(1, want), rpm - window.requests)
            window.requests += granted
        left = max(window.started + WINDOW_S - now, 0.0)
        return Grant(granted, left, window.started, window.requests, window.tokens)

    def acquire(self, jti: str, rpm: int, tpm: int) -> float | None:
        """Counts one request of `jti` and returns None, or the seconds until the window ends
        when its requests or tokens are spent."""
        grant = self.lease(jti, rpm, tpm)
        return None if grant.granted else grant.window_left_s

    def add_tokens(self, jti: str, tokens: int, tpm: int = 0) -> bool:
        """Tokens a finished request of `jti` used, counted in the current window; True when
        the window's tokens now reach `tpm` (the caller drops what it leased)."""
        window = self._window(jti, self._clock())
        window.tokens += max(0, tokens)
        return bool(tpm) and window.tokens >= tpm

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

    async def lease(
        self, jti: str, rpm: int, tpm: int, want: int, give_back: tuple[float, int]
    ) -> Grant:
        return self.service.lease(jti, rpm, tpm, want, give_back)

    async def add_tokens(self, jti: str, tokens: int, tpm: int) -> bool:
        return self.service.add_tokens(jti, tokens, tpm)

    async def usage(self, jti: str) -> tuple[int, int]:
        return self.service.usage(jti)

    async def leases(self) -> int:
        return self.service.leases


def rate_limiter() -> ActorHandle:
    """The cluster's limiter actor, created by whoever asks first."""
    # cast: Ray's stubs type `.remote()` on an actor class as handle-or-class.
    return cast(
        ActorHandle,
        RateLimiter.options(  # type: ignore[attr-defined]
            name=LIMITER_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(),
    )


@dataclass(frozen=True)
class Refusal:
    """A request refused: whole seconds until the key's window ends (at least 1), and what the
    window has counted (to name the quota that is spent)."""

    retry_after_s: float
    requests: int
    tokens: int


@dataclass
class _Lease:
    window: float  # the limiter's id of the window the requests belong to
    left: int  # requests not yet used
    size: int  # requests granted
    expires: float  # on this replica's clock: the window's end, or LEASE_S, whichever is first


class SharedRateLimiter:
    """A replica's view of the limiter actor; Ray failures become ServiceUnavailableError.

    A key's requests are taken from the actor in leases: one request at first, twice as many
    each time a lease is used up within LEASE_S, at most `lease_cap(rpm)`; after a lease that
    expired, as many as it served. A busy key so costs an actor call every few requests, a quiet
    one a call per request. Unused requests go back with the key's next lease; a replica that
    stops seeing the key keeps at most one lease's worth of its window unused. A lease never
    outlives its window, and is dropped when the key's tokens are spent."""

    def __init__(
        self, actor: ActorHandle | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._actor: Any = actor if actor is not None else rate_limiter()
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._asking: dict[str, asyncio.Future[Grant]] = {}  # one lease call per key at a time
        self._calls = 0

    async def acquire(self, jti: str, rpm: int, tpm: int) -> Refusal | None:
        """None when the request may go on, else the Refusal."""
        self._sweep()
        while True:
            lease = self._leases.get(jti)
            if lease is not None and lease.left > 0 and self._clock() < lease.expires:
                lease.left -= 1
                return None
            grant = await self._lease(jti, rpm, tpm)
            if not grant.granted:
                wait_s = float(max(1, math.ceil(grant.window_left_s)))
                return Refusal(wait_s, grant.requests, grant.tokens)

    async def add_tokens(self, jti: str, tokens: int, tpm: int) -> None:
        """Counts tokens already served: a failure is logged, never the caller's error."""
        try:
            spent = await self._actor.add_tokens.remote(jti, tokens, tpm)
        except RayActorError:
            log.exception("cannot count %d tokens of key %s", tokens, jti)
            return
        if spent:
            self._leases.pop(jti, None)  # the next request asks, and is refused

    async def _lease(self, jti: str, rpm: int, tpm: int) -> Grant:
        """A new lease for `jti` (installed for every waiter), the call shared by concurrent
        requests of the key."""
        asking = self._asking.get(jti)
        if asking is not None:
            return await asyncio.shield(asking)
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._asking[jti] = future
        try:
            grant = await self._call(jti, rpm, tpm)
            future.set_result(grant)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, none may be left to
            raise
        finally:
            del self._asking[jti]
        return grant

    async def _call(self, jti: str, rpm: int, tpm: int) -> Grant:
        old, now = self._leases.pop(jti, None), self._clock()
        size = 1
        give_back: tuple[float, int] = (0.0, 0)
        if old is not None:
            give_back = (old.window, old.left)
            used_up = old.left == 0 and now < old.expires
            size = old.size * 2 if used_up else max(1, old.size - old.left)
        want = min(size, lease_cap(rpm))
        try:
            grant: Grant = await self._actor.lease.remote(jti, rpm, tpm, want, give_back)
        except RayActorError as exc:
            raise ServiceUnavailableError(f"the rate limiter is unavailable: {exc}") from None
        if grant.granted:
            expires = now + min(LEASE_S, grant.window_left_s)
            # The caller and whoever waited with it take theirs from it (acquire's loop).
            self._leases[jti] = _Lease(grant.window, grant.granted, grant.granted, expires)
        return grant

    def _sweep(self) -> None:
        self._calls += 1
        if self._calls % SWEEP_EVERY == 0:
            now = self._clock()
            for jti in [k for k, lease in self._leases.items() if lease.expires <= now]:
                del self._leases[jti]


def lease_cap(rpm: int) -> int:
    """The most requests one replica leases at once: a twentieth of `rpm` (so replicas that hold
    leases unused keep little of a window from the others), never more than MAX_LEASE."""
    return MAX_LEASE if not rpm else max(1, min(MAX_LEASE, rpm // 20))
