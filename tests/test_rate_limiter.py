"""Per-key rate limits without Ray: the window logic, the settings, the error and its 429."""

from __future__ import annotations

import pickle

import httpx
import pytest
from fastapi import FastAPI

from actors.rate_limiter import WINDOW_S, RateLimitService
from cave.errors import ConfigError, QuotaExceededError, RateLimitedError
from config.llm import DEFAULT_RPM, DEFAULT_TPM, load_llm_settings
from deployments.http.errors import install_error_handlers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limits(clock: Clock) -> RateLimitService:
    return RateLimitService(clock)


def test_requests_past_the_rpm_are_refused_until_the_minute_ends(
    limits: RateLimitService, clock: Clock
) -> None:
    assert [limits.acquire("k", 3, 0) for _ in range(3)] == [None, None, None]
    clock.now += 20
    assert limits.acquire("k", 3, 0) == pytest.approx(WINDOW_S - 20)
    assert limits.usage("k") == (3, 0)  # a refused request is not counted
    clock.now += WINDOW_S - 20
    assert limits.acquire("k", 3, 0) is None


def test_keys_have_their_own_budgets(limits: RateLimitService) -> None:
    assert limits.acquire("a", 1, 0) is None
    assert limits.acquire("a", 1, 0) is not None
    assert limits.acquire("b", 1, 0) is None


def test_tokens_used_in_the_minute_refuse_the_next_request(
    limits: RateLimitService, clock: Clock
) -> None:
    assert limits.acquire("k", 0, 100) is None
    limits.add_tokens("k", 60)
    assert limits.acquire("k", 0, 100) is None  # 60 < 100: one more may start
    limits.add_tokens("k", 60)
    assert limits.acquire("k", 0, 100) is not None
    clock.now += WINDOW_S
    assert limits.acquire("k", 0, 100) is None
    assert limits.usage("k") == (1, 0)


def test_no_limit_never_refuses(limits: RateLimitService) -> None:
    for _ in range(1000):
        assert limits.acquire("k", 0, 0) is None
    limits.add_tokens("k", 10**9)
    assert limits.acquire("k", 0, 0) is None


def test_ended_windows_are_forgotten(limits: RateLimitService, clock: Clock) -> None:
    for i in range(2000):
        limits.acquire(f"key-{i}", 5, 0)
    clock.now += WINDOW_S
    for _ in range(2048):
        limits.acquire("live", 0, 0)
    assert len(limits._windows) == 1


@pytest.mark.parametrize(
    ("env", "rpm", "tpm"),
    [
        ({}, DEFAULT_RPM, DEFAULT_TPM),  # limited unless "no limit" is asked for
        ({"CAVE_LLM_RPM": "0", "CAVE_LLM_TPM": ""}, 0, DEFAULT_TPM),
        ({"CAVE_LLM_RPM": "0", "CAVE_LLM_TPM": "0"}, 0, 0),
        ({"CAVE_LLM_RPM": " 30 ", "CAVE_LLM_TPM": "5000"}, 30, 5000),
    ],
)
def test_limits_come_from_the_environment(env: dict[str, str], rpm: int, tpm: int) -> None:
    settings = load_llm_settings(env)
    assert (settings.rpm, settings.tpm) == (rpm, tpm)


@pytest.mark.parametrize("raw", ["-1", "ten", "1.5", "1000000001"])
@pytest.mark.parametrize("variable", ["CAVE_LLM_RPM", "CAVE_LLM_TPM"])
def test_a_malformed_limit_is_a_config_error(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_llm_settings({variable: raw})


def test_the_error_pickles_with_its_wait() -> None:
    error = pickle.loads(pickle.dumps(RateLimitedError("spent", 12.5)))
    assert isinstance(error, RateLimitedError) and isinstance(error, QuotaExceededError)
    assert (error.message, error.retry_after_s, error.code) == ("spent", 12.5, "rate_limited")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_error_is_a_429_with_retry_after() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimitedError("spent", 12.2)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/limited")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "13"
    assert response.json()["error"]["code"] == "rate_limited"


def test_a_lease_grants_several_requests_never_past_the_rpm(limits: RateLimitService) -> None:
    first = limits.lease("k", 10, 0, want=8)
    assert (first.granted, first.requests) == (8, 8)
    second = limits.lease("k", 10, 0, want=8)
    assert (second.granted, second.requests) == (2, 10)  # what is left of the minute
    refused = limits.lease("k", 10, 0, want=8)
    assert refused.granted == 0 and refused.window_left_s == pytest.approx(WINDOW_S)


def test_requests_given_back_serve_the_next_lease(limits: RateLimitService) -> None:
    first = limits.lease("k", 10, 0, want=10)
    assert limits.lease("k", 10, 0).granted == 0
    again = limits.lease("k", 10, 0, want=4, give_back=(first.window, 6))  # 4 served
    assert (again.granted, again.requests) == (4, 8)


def test_requests_given_back_to_an_ended_window_are_ignored(
    limits: RateLimitService, clock: Clock
) -> None:
    old = limits.lease("k", 10, 0, want=10)
    clock.now += WINDOW_S
    fresh = limits.lease("k", 10, 0, want=1, give_back=(old.window, 10))
    assert (fresh.granted, fresh.requests) == (1, 1) and fresh.window != old.window


def test_add_tokens_says_when_the_tpm_is_spent(limits: RateLimitService) -> None:
    assert limits.add_tokens("k", 60, 100) is False
    assert limits.add_tokens("k", 40, 100) is True
    assert limits.add_tokens("k", 10**6, 0) is False  # no token limit: never spent
