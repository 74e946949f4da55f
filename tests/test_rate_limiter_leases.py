"""Gateway replicas lease a key's requests from the one limiter actor (real Ray): no more than
the key's rpm is ever admitted across replicas, a busy key costs few actor calls, and unused or
spent leases do not keep requests from others."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from actors.rate_limiter import LEASE_S, RateLimiter, SharedRateLimiter, lease_cap
from cave.db import new_id

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("ray_cluster")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """A replica's clock, moved by hand so that a lease's expiry needs no sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def actor() -> Iterator[Any]:
    """A limiter actor of the test's own (the gateway's is a named, detached one)."""
    handle: Any = RateLimiter.remote()  # type: ignore[attr-defined]
    yield handle
    ray.kill(handle)


async def admitted(replica: SharedRateLimiter, jti: str, rpm: int, n: int) -> int:
    answers = await asyncio.gather(*(replica.acquire(jti, rpm, 0) for _ in range(n)))
    return sum(answer is None for answer in answers)


async def test_replicas_together_admit_exactly_the_rpm(actor: Any) -> None:
    replicas = [SharedRateLimiter(actor) for _ in range(3)]
    jti, rpm = new_id(), 100
    counts = []
    for _ in range(4):  # bursts: the leases grow, and still nothing past the minute's 100
        counts += await asyncio.gather(*(admitted(r, jti, rpm, 30) for r in replicas))
    assert sum(counts) == rpm
    refusal = await replicas[0].acquire(jti, rpm, 0)
    assert refusal is not None and 1 <= refusal.retry_after_s <= 60
    assert refusal.requests == rpm


async def test_a_busy_key_costs_an_actor_call_every_few_requests(actor: Any) -> None:
    replica, jti = SharedRateLimiter(actor), new_id()
    for _ in range(200):
        assert await replica.acquire(jti, 600, 0) is None
    calls = await actor.leases.remote()
    assert calls <= 200 / lease_cap(600) + 6  # 1, 2, 4, 8, then leases of lease_cap(600)
    requests, _ = await actor.usage.remote(jti)
    assert 200 <= requests < 200 + lease_cap(600)  # counted ahead by at most one lease


async def test_a_quiet_replicas_unused_lease_goes_back_with_its_next_one(actor: Any) -> None:
    clock = Clock()
    quiet, busy = SharedRateLimiter(actor, clock), SharedRateLimiter(actor)
    jti, rpm = new_id(), 40  # leases of at most 2
    for _ in range(2):
        assert await quiet.acquire(jti, rpm, 0) is None  # leases 1, then 2: one left unused
    assert await admitted(busy, jti, rpm, 60) == rpm - 3  # the quiet one's lease still counts
    clock.now += LEASE_S  # its lease expired: the next acquire returns the unused request
    assert await quiet.acquire(jti, rpm, 0) is None
    assert (await actor.usage.remote(jti))[0] == rpm


async def test_a_key_whose_tokens_are_spent_is_refused_at_once(actor: Any) -> None:
    replica, jti, tpm = SharedRateLimiter(actor), new_id(), 50
    for _ in range(8):  # the replica holds a lease of several requests now
        assert await replica.acquire(jti, 600, tpm) is None
    await replica.add_tokens(jti, 60, tpm)
    refusal = await replica.acquire(jti, 600, tpm)
    assert refusal is not None and refusal.tokens == 60


async def test_a_lost_limiter_is_a_503_not_an_admission(actor: Any) -> None:
    from cave.errors import ServiceUnavailableError

    replica = SharedRateLimiter(actor)
    ray.kill(actor, no_restart=True)
    with pytest.raises(ServiceUnavailableError, match="rate limiter"):
        await replica.acquire(new_id(), 10, 0)
