"""The OpenAI-compatible chat gateway, with the real `openai` client, on the tiny CPU model."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.api.conftest import TINY_MODEL, ApiServer, approved_model_key, openai_client
from tests.support import poll_until

NAMESPACE = "chat-team"


@pytest.fixture(scope="module")
def model_key(api_server: ApiServer) -> dict:
    return approved_model_key(api_server, NAMESPACE, TINY_MODEL)


def client_for(api_server: ApiServer, token: str, namespace: str = NAMESPACE) -> openai.OpenAI:
    return openai_client(api_server.url, token, namespace)


def test_models_lists_the_served_model(api_server: ApiServer, model_key: dict) -> None:
    models = client_for(api_server, model_key["model_access_key"]).models.list()
    assert TINY_MODEL in {m.id for m in models.data}


def test_a_completion_in_one_response(api_server: ApiServer, model_key: dict) -> None:
    client = client_for(api_server, model_key["model_access_key"])
    done = client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        seed=1,
    )
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens >= 1
    assert done.usage.prompt_tokens > 0
    assert isinstance(done.choices[0].message.content, str)


def test_a_streamed_completion_ends_with_usage(api_server: ApiServer, model_key: dict) -> None:
    client = client_for(api_server, model_key["model_access_key"])
    chunks = list(
        client.chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "count"}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert len(chunks) >= 3 and isinstance(text, str)


def test_usage_is_recorded(api_server: ApiServer, model_key: dict) -> None:
    client = client_for(api_server, model_key["model_access_key"])
    client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3
    )

    def rows() -> list[tuple[int, int, str]]:
        with sqlite3.connect(api_server.env["BKG_DB_PATH"]) as db:
            return db.execute(
                "SELECT prompt_tokens, completion_tokens, served_by FROM usage_events"
                " WHERE token_id = ?",
                (model_key["token_id"],),
            ).fetchall()

    recorded = poll_until(rows, 20, "usage event")
    assert all(prompt > 0 and served == "local" for prompt, _, served in recorded)


def _chat(api_server: ApiServer, token: str, namespace: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{api_server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}", "X-Cave-Namespace": namespace},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("mutate", "status", "code"),
    [
        (lambda t, ns, m: ("not-a-jwt", ns, m), 401, "unauthorized"),
        (lambda t, ns, m: (t[:-4] + "AAAA", ns, m), 401, "unauthorized"),
        (lambda t, ns, m: (t, "other-team", m), 403, "namespace_mismatch"),
        (lambda t, ns, m: (t, ns, "other-model"), 403, "forbidden"),
    ],
    ids=["garbage", "bad-signature", "wrong-namespace", "wrong-model"],
)
def test_bad_keys_are_refused(
    api_server: ApiServer,
    model_key: dict,
    mutate: Callable[[str, str, str], tuple[str, str, str]],
    status: int,
    code: str,
) -> None:
    response = _chat(api_server, *mutate(model_key["model_access_key"], NAMESPACE, TINY_MODEL))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"].startswith(code.split("_")[0])


def test_revocation_takes_effect_at_once(api_server: ApiServer) -> None:
    issued = approved_model_key(api_server, NAMESPACE, TINY_MODEL)
    token = issued["model_access_key"]
    assert _chat(api_server, token, NAMESPACE, TINY_MODEL).status_code == 200
    with api_server.client() as admin:
        revoked = admin.post(
            f"/api/v1/admin/llm/models/{TINY_MODEL}/revoke_key",
            json={"token_id": issued["token_id"]},
        )
    assert revoked.status_code == 204
    refused = _chat(api_server, token, NAMESPACE, TINY_MODEL)
    assert refused.status_code == 403, refused.text
    with pytest.raises(openai.PermissionDeniedError):
        client_for(api_server, token).chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
