"""Forged, misused and withdrawn model-access keys over HTTP: 401 or 403, and no engine call."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ray import serve

from deployments.http.app import APP_NAME
from deployments.llm.engine import engine_deployment_name
from tests.api.conftest import TINY_MODEL, ApiServer, approved_model_key
from tests.api.test_chat import NAMESPACE
from tests.support import poll_until


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(head))),
        json.loads(base64.urlsafe_b64decode(pad(body))),
    )


def _encode(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def tampered(token: str, _: dict[str, Any]) -> str:
    header, claims = _parts(token)
    claims["cave_ns"] = "someone-else"
    return f"{_encode(header, claims)}.{token.split('.')[2]}"


def other_key(token: str, _: dict[str, Any]) -> str:
    header, claims = _parts(token)
    signing_input = _encode(header, claims)
    signature = Ed25519PrivateKey.generate().sign(signing_input.encode())
    return f"{signing_input}.{_b64(signature)}"


def alg_none(token: str, _: dict[str, Any]) -> str:
    header, claims = _parts(token)
    return f"{_encode({**header, 'alg': 'none'}, claims)}."


def hs256_with_public_key(token: str, jwks: dict[str, Any]) -> str:
    header, claims = _parts(token)
    public = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    secret = base64.urlsafe_b64decode(public["x"] + "=" * (-len(public["x"]) % 4))
    signing_input = _encode({**header, "alg": "HS256"}, claims)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def unknown_kid(token: str, _: dict[str, Any]) -> str:
    header, claims = _parts(token)
    signing_input = _encode({**header, "kid": "no-such-kid"}, claims)
    return f"{signing_input}.{_b64(Ed25519PrivateKey.generate().sign(signing_input.encode()))}"


def engine_requests() -> int:
    handle = serve.get_deployment_handle(engine_deployment_name(TINY_MODEL), app_name=APP_NAME)
    return int(handle.requests_served.remote().result())


def chat(
    api_server: ApiServer, token: str, namespace: str = NAMESPACE, model: str = TINY_MODEL
) -> httpx.Response:
    return httpx.post(
        f"{api_server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}", "X-Cave-Namespace": namespace},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )


@pytest.fixture(scope="module")
def issued(api_server: ApiServer) -> dict[str, Any]:
    with api_server.client() as admin:
        jwks = admin.get("/.well-known/jwks.json").json()
    return {"key": approved_model_key(api_server, NAMESPACE, TINY_MODEL), "jwks": jwks}


@pytest.mark.parametrize(
    "forge", [tampered, other_key, alg_none, hs256_with_public_key, unknown_kid]
)
def test_forged_keys_are_401_and_reach_no_engine(
    api_server: ApiServer, issued: dict[str, Any], forge: Callable[[str, dict[str, Any]], str]
) -> None:
    before = engine_requests()
    response = chat(api_server, forge(issued["key"]["model_access_key"], issued["jwks"]))
    assert response.status_code == 401, response.text
    assert engine_requests() == before


@pytest.mark.parametrize(
    ("namespace", "model", "code"),
    [("other-team", TINY_MODEL, "namespace_mismatch"), (NAMESPACE, "other-model", "forbidden")],
)
def test_misused_keys_are_403_and_reach_no_engine(
    api_server: ApiServer, issued: dict[str, Any], namespace: str, model: str, code: str
) -> None:
    before = engine_requests()
    response = chat(api_server, issued["key"]["model_access_key"], namespace, model)
    assert (response.status_code, response.json()["error"]["code"]) == (403, code)
    assert engine_requests() == before


def test_an_expired_key_is_401(api_server: ApiServer) -> None:
    with api_server.client() as admin:
        made = admin.post(
            "/api/v1/auth/keys", json={"namespace": NAMESPACE, "scopes": ["llm:request"]}
        ).json()
    with api_server.client(made["key"]) as tenant:
        asked = tenant.post(
            "/api/v1/llm/requests",
            json={"model_id": TINY_MODEL, "cave_namespace": NAMESPACE, "ttl_s": 1},
        ).json()
    with api_server.client() as admin:
        token = admin.post(f"/api/v1/admin/llm/requests/{asked['id']}/approve").json()
    # The verifier allows CAVE_LLM_LEEWAY_S of clock skew (1 s in tests): poll past it.
    refused = poll_until(
        lambda: chat(api_server, token["model_access_key"]).status_code == 401, 30, "expiry"
    )
    assert refused
    before = engine_requests()
    response = chat(api_server, token["model_access_key"])
    assert response.json()["error"]["code"] == "token_expired"
    assert engine_requests() == before


def _rename_tokens_table(api_server: ApiServer, old: str, new: str) -> None:
    with contextlib.closing(sqlite3.connect(api_server.env["BKG_DB_PATH"], timeout=30)) as db:
        db.execute(f"ALTER TABLE {old} RENAME TO {new}")
        db.commit()


def test_a_replica_that_cannot_read_revocations_refuses_keys_with_503(
    api_server: ApiServer, issued: dict[str, Any]
) -> None:
    """The revocation table becomes unreadable under the running gateway: once its view is
    older than CAVE_LLM_REVOCATION_MAX_AGE_S every model-access key is a 503 with Retry-After
    (never a pass), and service comes back by itself when the table does."""
    token = issued["key"]["model_access_key"]
    assert chat(api_server, token).status_code == 200
    _rename_tokens_table(api_server, "model_access_tokens", "model_access_tokens_away")
    try:
        refused = poll_until(
            lambda: (r := chat(api_server, token)).status_code == 503 and r, 60, "a stale view"
        )
        assert refused.json()["error"]["code"] == "revocations_stale"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        _rename_tokens_table(api_server, "model_access_tokens_away", "model_access_tokens")
    assert poll_until(lambda: chat(api_server, token).status_code == 200, 60, "recovery")
