"""Every model-access key is rate limited by default: its requests and tokens per minute are
signed into it at approval (asked for by the namespace, set by the admin, or the defaults),
and a key past either gets 429 naming the quota, with Retry-After; no limit must be granted."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest

from config.llm import DEFAULT_RPM, DEFAULT_TPM
from tests.api.conftest import TINY_MODEL, ApiServer, approved_model_key, openai_client

NAMESPACE = "limits-team"


def claims_of(token: str) -> dict[str, Any]:
    """The JWT's payload as any holder can read it (no verification needed to look)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def chat(api_server: ApiServer, token: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(
        f"{api_server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}", "X-Cave-Namespace": NAMESPACE},
        json={**body, "max_tokens": max_tokens},
        timeout=60,
    )


def test_a_key_approved_without_limits_gets_the_defaults(api_server: ApiServer) -> None:
    approved = approved_model_key(api_server, NAMESPACE, TINY_MODEL)
    assert (approved["rpm"], approved["tpm"]) == (DEFAULT_RPM, DEFAULT_TPM)
    claims = claims_of(approved["model_access_key"])
    assert (claims["cave_rpm"], claims["cave_tpm"]) == (DEFAULT_RPM, DEFAULT_TPM)
    with api_server.client() as admin:
        listed = admin.get("/api/v1/admin/llm/requests", params={"state": "approved"}).json()
    mine = next(r for r in listed["items"] if r["id"] == approved["id"])
    assert (mine["rpm"], mine["tpm"]) == (DEFAULT_RPM, DEFAULT_TPM)  # what was granted


def test_a_key_past_its_requests_per_minute_gets_429_naming_rpm(api_server: ApiServer) -> None:
    approved = approved_model_key(api_server, NAMESPACE, TINY_MODEL, asked={"rpm": 2})
    token = approved["model_access_key"]
    assert [chat(api_server, token).status_code for _ in range(2)] == [200, 200]
    refused = chat(api_server, token)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and "rpm" in error["message"]
    assert error["details"] == [{"quota": "rpm", "limit": 2, "used": 2}]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # The real openai client sees a RateLimitError it can back off on.
    client = openai_client(api_server.url, token, NAMESPACE)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_a_key_past_its_tokens_per_minute_gets_429_naming_tpm(api_server: ApiServer) -> None:
    approved = approved_model_key(api_server, NAMESPACE, TINY_MODEL, asked={"tpm": 5})
    token = approved["model_access_key"]
    first = chat(api_server, token, max_tokens=4)  # a window below its tokens lets one in
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    assert used >= 5  # the prompt alone is longer than the key's minute
    refused = chat(api_server, token)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["details"] == [{"quota": "tpm", "limit": 5, "used": used}]


def test_one_keys_spent_minute_leaves_another_key_of_the_namespace_alone(
    api_server: ApiServer,
) -> None:
    spent = approved_model_key(api_server, NAMESPACE, TINY_MODEL, asked={"rpm": 1})
    other = approved_model_key(api_server, NAMESPACE, TINY_MODEL, asked={"rpm": 1})
    assert chat(api_server, spent["model_access_key"]).status_code == 200
    assert chat(api_server, spent["model_access_key"]).status_code == 429
    assert chat(api_server, other["model_access_key"]).status_code == 200


def test_the_admin_grants_other_limits_than_asked_and_only_the_admin_grants_none(
    api_server: ApiServer,
) -> None:
    granted = approved_model_key(
        api_server, NAMESPACE, TINY_MODEL, asked={"rpm": 1}, granted={"rpm": 0, "tpm": 0}
    )
    assert (granted["rpm"], granted["tpm"]) == (0, 0)
    token = granted["model_access_key"]
    assert [chat(api_server, token).status_code for _ in range(3)] == [200] * 3  # asked 1: not it
    asked = {"model_id": TINY_MODEL, "cave_namespace": NAMESPACE}
    with api_server.client() as admin:  # the admin's own key may ask too: same rule
        for limits in ({"rpm": 0}, {"tpm": 0}, {"rpm": -1}, {"rpm": 2**40}, {"tpm": "many"}):
            answer = admin.post("/api/v1/llm/requests", json={**asked, **limits})
            assert answer.status_code == 422, (limits, answer.text)
            assert answer.json()["error"]["code"] == "validation_error"
        pending = admin.post("/api/v1/llm/requests", json=asked).json()
        approve = f"/api/v1/admin/llm/requests/{pending['id']}/approve"
        for limits in ({"rpm": -1}, {"tpm": 2**40}, {"burst": 3}):
            answer = admin.post(approve, json=limits)
            assert answer.status_code == 422, (limits, answer.text)
        still = admin.get("/api/v1/admin/llm/requests", params={"state": "pending"}).json()
        assert pending["id"] in {r["id"] for r in still["items"]}  # refused: nothing decided


def test_a_key_with_its_limits_edited_no_longer_verifies(api_server: ApiServer) -> None:
    approved = approved_model_key(api_server, NAMESPACE, TINY_MODEL, asked={"rpm": 1})
    header, payload, signature = approved["model_access_key"].split(".")
    claims = {**claims_of(approved["model_access_key"]), "cave_rpm": 0}
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    refused = chat(api_server, f"{header}.{edited}.{signature}")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
