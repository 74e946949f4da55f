"""The model-access flow over HTTP: request, review, the signed key, JWKS, revocation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.api.conftest import ApiServer


def _request(api_server: ApiServer, key: str, namespace: str, model: str) -> dict[str, Any]:
    with api_server.client(key) as client:
        response = client.post(
            "/api/v1/llm/requests",
            json={"model_id": model, "cave_namespace": namespace, "reason": "tests"},
        )
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_request_approve_gives_a_signed_key_that_jwks_verifies(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    key = namespace_key("llm-team", ["llm:request"])
    asked = _request(api_server, key, "llm-team", "tiny")
    assert asked["state"] == "pending"
    with api_server.client() as admin:
        pending = admin.get("/api/v1/admin/llm/requests", params={"state": "pending"}).json()
        assert asked["id"] in {r["id"] for r in pending["items"]}
        approved = admin.post(f"/api/v1/admin/llm/requests/{asked['id']}/approve")
        assert approved.status_code == 200, approved.text
        body = approved.json()
        assert body["state"] == "approved"
        again = admin.post(f"/api/v1/admin/llm/requests/{asked['id']}/approve")
        assert again.status_code == 409
        jwks = admin.get("/.well-known/jwks.json").json()
    token = body["model_access_key"]
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["typ"]) == ("EdDSA", "at+jwt")
    public = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}[header["kid"]]
    claims = jwt.decode(token, public.key, algorithms=["EdDSA"], audience="cave-llm")
    assert (claims["cave_ns"], claims["model_id"], claims["jti"]) == (
        "llm-team",
        "tiny",
        body["token_id"],
    )
    assert claims["scopes"] == ["llm:chat"]


def test_deny_and_who_may_review(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    key = namespace_key("llm-deny", ["llm:request"])
    asked = _request(api_server, key, "llm-deny", "tiny")
    with api_server.client(key) as tenant:
        assert tenant.post(f"/api/v1/admin/llm/requests/{asked['id']}/approve").status_code == 403
        assert tenant.get("/api/v1/admin/llm/requests").status_code == 403
        other = tenant.post(
            "/api/v1/llm/requests", json={"model_id": "tiny", "cave_namespace": "someone-else"}
        )
        assert other.status_code == 403
    with api_server.client() as admin:
        denied = admin.post(f"/api/v1/admin/llm/requests/{asked['id']}/deny")
        assert (denied.status_code, denied.json()["state"]) == (200, "denied")
        unknown = admin.post("/api/v1/admin/llm/requests/nope/approve")
        assert unknown.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"model_id": "tiny"},
        {"model_id": "", "cave_namespace": "x"},
        {"model_id": "tiny", "cave_namespace": "x", "scopes": ["root"]},
        {"model_id": "tiny", "cave_namespace": "x", "ttl_s": -1},
        {"model_id": "tiny", "cave_namespace": "x", "extra": 1},
    ],
)
def test_bad_requests_are_422(api_server: ApiServer, body: dict[str, Any]) -> None:
    with api_server.client() as admin:
        response = admin.post("/api/v1/llm/requests", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


def test_a_key_without_llm_request_scope_cannot_ask(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    key = namespace_key("llm-noscope", ["sandboxes:read"])
    with api_server.client(key) as tenant:
        response = tenant.post(
            "/api/v1/llm/requests", json={"model_id": "tiny", "cave_namespace": "llm-noscope"}
        )
    assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")


def test_the_registry_says_where_each_model_is_served(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    with api_server.client() as admin:
        listed = admin.get("/api/v1/admin/llm/models")
    assert listed.status_code == 200, listed.text
    models = {m["model_id"]: m["served_at"] for m in listed.json()["models"]}
    assert models["tiny"] == [{"kind": "local", "name": "local", "engine": "cpu", "healthy": True}]
    tenant_key = namespace_key("llm-registry", ["llm:request"])
    with api_server.client(tenant_key) as tenant:
        assert tenant.get("/api/v1/admin/llm/models").status_code == 403
