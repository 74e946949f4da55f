"""One CAVE API per test session: a real Serve app on the session's Ray cluster, over HTTP."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai
import pytest

from cluster.ingress import listen_ports
from tests.inference.tiny_model import build_tiny_model
from tests.support import poll_until

TINY_MODEL = "tiny"  # the random-weight chat model every API test session serves


@dataclass(frozen=True)
class ApiServer:
    url: str
    admin_key: str
    env: dict[str, str]
    models: list[dict[str, Any]] = field(default_factory=list)  # its engines: keep on redeploy

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)


def api_env(root: Path, state_dir: Path, url: str = "") -> dict[str, str]:
    env = {
        "BKG_DB_PATH": str(root / "cave.db"),
        "CAVE_SECRETS_DIR": str(root / "secrets"),
        "CAVE_STATE_DIR": str(state_dir),
        "CAVE_POOL_SIZE": "2",
        "CAVE_AUDIT_LOG_ENABLED": "true",
        "CAVE_AUDIT_LOG_PATH": str(root / "audit" / "audit.jsonl"),
        "CAVE_AUDIT_LOG_HMAC_KEY": base64.b64encode(secrets.token_bytes(32)).decode().rstrip("="),
        "CAVE_UPKEEP_INTERVAL_S": "0.2",
        "CAVE_ROTATION_WEBHOOK_SECRET": "test-webhook-secret",
        "CAVE_LLM_LEEWAY_S": "1",  # so that an expiry test waits one second, not thirty
    }
    if url:  # the API delivers its rotation webhooks to its own receiver
        env["CAVE_ROTATION_WEBHOOK_URL"] = f"{url}/api/v1/auth/keys/rotated"
    return env


@pytest.fixture(scope="session")
def api_server(
    ray_cluster: None, cave_state_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    from ray import serve

    from cave.auth.bootstrap import create_admin_key
    from deployments.http.app import APP_NAME, build_app

    port = listen_ports(1)[0]  # below the ephemeral range: nothing outgoing can take it
    root = tmp_path_factory.mktemp("api")
    env = api_env(root, cave_state_dir, f"http://127.0.0.1:{port}")
    admin_key = asyncio.run(create_admin_key({**os.environ, **env}))
    models = [
        {"model_id": TINY_MODEL, "engine": "cpu", "source": str(build_tiny_model(root / "tiny"))}
    ]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"env": env, "models": models}), name=APP_NAME, route_prefix="/")
    server = ApiServer(f"http://127.0.0.1:{port}", admin_key, env, models)
    with server.client() as client:
        poll_until(lambda: client.get("/readyz").status_code == 200, timeout_s=60)
    yield server
    serve.shutdown()


def redeploy(api_server: ApiServer, env: dict[str, str]) -> None:
    """The session's API with other settings (its replicas replaced); its engines stay."""
    from ray import serve

    from deployments.http.app import APP_NAME, build_app

    app = build_app({"env": env, "models": api_server.models})
    serve.run(app, name=APP_NAME, route_prefix="/")
    with api_server.client() as client:
        poll_until(lambda: client.get("/readyz").status_code == 200, 60, "API ready")


class HasClient(Protocol):
    def client(self, key: str | None = None) -> httpx.Client: ...


def make_namespace_key(server: HasClient, namespace: str, scopes: list[str]) -> str:
    """A new namespace key, made with the server's admin key."""
    with server.client() as client:
        response = client.post(
            "/api/v1/auth/keys",
            json={"kind": "namespace", "namespace": namespace, "scopes": scopes},
        )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def approved_model_key(
    server: HasClient,
    namespace: str,
    model: str,
    asked: dict[str, Any] | None = None,
    granted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model-access key as a tenant gets one: its namespace key (scope llm:request) asks for
    the model (and `asked`: rpm, tpm, ...), the admin approves (with `granted` as the body); the
    approval's body (`model_access_key`, `token_id`, `rpm`, ...)."""
    request_key = make_namespace_key(server, namespace, ["llm:request"])
    with server.client(request_key) as tenant:
        asked_for = {"model_id": model, "cave_namespace": namespace, **(asked or {})}
        answer = tenant.post("/api/v1/llm/requests", json=asked_for)
    assert answer.status_code == 201, answer.text
    with server.client() as admin:
        approve = f"/api/v1/admin/llm/requests/{answer.json()['id']}/approve"
        approved = admin.post(approve, json=granted) if granted else admin.post(approve)
    assert approved.status_code == 200, approved.text
    return dict(approved.json())


def openai_client(url: str, token: str, namespace: str) -> openai.OpenAI:
    """The real `openai` client on a gateway at `url`, with a model-access key."""
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=token,
        default_headers={"X-Cave-Namespace": namespace},
        max_retries=0,
        timeout=120,
    )


@pytest.fixture
def namespace_key(api_server: ApiServer) -> Callable[[str, list[str]], str]:
    def make(namespace: str, scopes: list[str]) -> str:
        return make_namespace_key(api_server, namespace, scopes)

    return make
