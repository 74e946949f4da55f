"""The model registry's admin writes over real HTTP: a model added with PUT is deployed as its own
Serve app, chats through the real `openai` client on every gateway (a second API app on the same
database shows it), and after DELETE is gone everywhere; the models file's models, bad specs and
namespace keys are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import TINY_MODEL, ApiServer, approved_model_key, openai_client
from tests.support import poll_until

ADDED = "tiny-added"
ADDED_APP = "cave-model-tiny-added"
NAMESPACE = "registry-team"
TWO_APP = "cave-registry-two"
TWO_PREFIX = "/registry-two"
MODELS = "/api/v1/admin/llm/models"


@pytest.fixture(scope="module")
def tiny_dir(api_server: ApiServer) -> Path:
    source = Path(api_server.env["BKG_DB_PATH"]).parent / "tiny"  # built by api_server
    assert (source / "config.json").is_file()
    return source


@pytest.fixture(scope="module")
def second_gateway(api_server: ApiServer) -> Iterator[str]:
    """A second API app on the session's database, with no models of its own: it learns of the
    admin API's models from the table alone, like another replica or a restarted one."""
    from ray import serve

    from deployments.http.app import build_app

    serve.run(
        build_app({"env": api_server.env, "models": []}), name=TWO_APP, route_prefix=TWO_PREFIX
    )
    url = f"{api_server.url}{TWO_PREFIX}"
    with httpx.Client(base_url=url, timeout=60) as client:
        poll_until(lambda: client.get("/readyz").status_code == 200, 120, "second gateway ready")
    yield url
    serve.delete(TWO_APP)


@pytest.fixture
def cleanup(api_server: ApiServer) -> Iterator[None]:
    """Whatever a test added is deleted, even when it fails half-way."""
    yield
    with api_server.client() as admin:
        gone = admin.delete(f"{MODELS}/{ADDED}")
    assert gone.status_code in (204, 404), gone.text


def model_key(api_server: ApiServer, model: str) -> dict[str, Any]:
    return approved_model_key(api_server, NAMESPACE, model)


def chat(base_url: str, token: str, model: str = ADDED) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}", "X-Cave-Namespace": NAMESPACE},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=120,
    )


def listed(api_server: ApiServer, model: str) -> dict[str, Any] | None:
    with api_server.client() as admin:
        response = admin.get(MODELS)
    assert response.status_code == 200, response.text
    return next((m for m in response.json()["models"] if m["model_id"] == model), None)


def model_ids(base_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{base_url}/v1/models", timeout=60).json()["data"]}


def serve_apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def audit_actions(api_server: ApiServer, model: str) -> list[str]:
    log = Path(api_server.env["CAVE_AUDIT_LOG_PATH"])
    actions = []
    for path in log.parent.glob(f"{log.stem}.*{log.suffix}"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("target") == model and event["action"].startswith("llm.model."):
                actions.append(event["action"])
    return actions


def test_an_added_model_is_served_everywhere_until_deleted(
    api_server: ApiServer, tiny_dir: Path, second_gateway: str, cleanup: None
) -> None:
    with api_server.client() as admin:
        put = admin.put(f"{MODELS}/{ADDED}", json={"engine": "cpu", "source": str(tiny_dir)})
    assert put.status_code == 201, put.text
    body = put.json()
    assert {k: body[k] for k in ("model_id", "origin", "app", "engine", "num_gpus")} == {
        "model_id": ADDED,
        "origin": "api",
        "app": ADDED_APP,
        "engine": "cpu",
        "num_gpus": 0.0,
    }
    assert ADDED in model_ids(api_server.url)  # this replica knows it at once

    def running() -> dict[str, Any]:
        entry = listed(api_server, ADDED) or {"served_at": [{"status": None}]}
        return entry if entry["served_at"][0]["status"] == "RUNNING" else {}

    entry = poll_until(running, 120, "the added model's app running")
    assert entry["origin"] == "api"
    local = entry["served_at"][0]
    assert (local["kind"], local["engine"], local["healthy"]) == ("local", "cpu", True)
    assert listed(api_server, TINY_MODEL)["origin"] == "config"  # type: ignore[index]

    key = model_key(api_server, ADDED)
    client = openai_client(api_server.url, key["model_access_key"], NAMESPACE)
    assert ADDED in {m.id for m in client.models.list().data}
    done = client.chat.completions.create(
        model=ADDED, messages=[{"role": "user", "content": "hello"}], max_tokens=4, seed=1
    )
    assert done.model == ADDED and done.usage is not None and done.usage.completion_tokens >= 1

    # Another gateway on the same database serves it too, from the table alone.
    assert ADDED in poll_until(lambda: model_ids(second_gateway), 10, "second gateway lists it")
    assert chat(second_gateway, key["model_access_key"]).status_code == 200

    # PUT again replaces the spec (200) and keeps serving.
    with api_server.client() as admin:
        again = admin.put(
            f"{MODELS}/{ADDED}",
            json={"engine": "cpu", "source": str(tiny_dir), "min_replicas": 1, "max_replicas": 2},
        )
    assert again.status_code == 200, again.text
    assert again.json()["max_replicas"] == 2
    done = client.chat.completions.create(
        model=ADDED, messages=[{"role": "user", "content": "again"}], max_tokens=2
    )
    assert done.usage is not None and done.usage.completion_tokens >= 1

    with api_server.client() as admin:
        deleted = admin.delete(f"{MODELS}/{ADDED}")
        assert deleted.status_code == 204, deleted.text
        assert admin.delete(f"{MODELS}/{ADDED}").status_code == 404
    refused = chat(api_server.url, key["model_access_key"])
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=ADDED, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert ADDED not in model_ids(api_server.url)
    assert listed(api_server, ADDED) is None
    assert ADDED_APP not in serve_apps()
    poll_until(lambda: ADDED not in model_ids(second_gateway), 10, "second gateway forgets it")
    assert chat(second_gateway, key["model_access_key"]).status_code == 404

    def three_events() -> list[str]:
        found = audit_actions(api_server, ADDED)
        return found if len(found) == 3 else []

    actions = poll_until(three_events, 20, "the audit events of the model's writes")
    assert sorted(actions) == ["llm.model.delete", "llm.model.put", "llm.model.put"]


def test_models_of_the_models_file_are_read_only(api_server: ApiServer, tiny_dir: Path) -> None:
    with api_server.client() as admin:
        put = admin.put(f"{MODELS}/{TINY_MODEL}", json={"engine": "cpu", "source": str(tiny_dir)})
        deleted = admin.delete(f"{MODELS}/{TINY_MODEL}")
    for response in (put, deleted):
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "conflict" and "models file" in error["message"]
    assert listed(api_server, TINY_MODEL)["origin"] == "config"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"engine": "tpu", "source": "TINY"}, "body.engine", "'cpu' or 'vllm'"),
        ({"engine": "cpu"}, "body.source", "required"),
        ({"engine": "cpu", "source": "/no/such/model"}, "body.source", "not a model directory"),
        ({"engine": "cpu", "source": "relative/tiny"}, "body.source", "absolute"),
        ({"engine": "cpu", "source": "TINY", "num_gpus": -1}, "body.num_gpus", "greater"),
        ({"engine": "cpu", "source": "TINY", "gpus": 1}, "body.gpus", "not permitted"),
        ({"engine": "vllm", "source": "Qwen/Qwen2.5-7B", "num_gpus": 1}, "body.num_gpus", "vLLM"),
        (
            {"engine": "cpu", "source": "TINY", "accelerator_type": "L4"},
            "body.accelerator_type",
            "vLLM",
        ),
        (
            {"engine": "cpu", "source": "TINY", "min_replicas": 2, "max_replicas": 1},
            "body.min_replicas",
            "above",
        ),
    ],
    ids=[
        "unknown-engine",
        "no-source",
        "missing-dir",
        "relative-dir",
        "negative-gpus",
        "unknown-field",
        "vllm-gpus",
        "cpu-accelerator",
        "replicas",
    ],
)
def test_bad_specs_are_422_with_the_field(
    api_server: ApiServer, tiny_dir: Path, body: dict[str, Any], loc: str, words: str
) -> None:
    if body.get("source") == "TINY":
        body = {**body, "source": str(tiny_dir)}
    with api_server.client() as admin:
        response = admin.put(f"{MODELS}/bad-spec", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert [d["loc"] for d in error["details"]] == [loc]
    assert words in error["details"][0]["msg"]
    assert listed(api_server, "bad-spec") is None


def test_a_vllm_model_needs_the_vllm_extra(api_server: ApiServer) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with api_server.client() as admin:
        response = admin.put(f"{MODELS}/qwen", json={"engine": "vllm", "source": "Qwen/Qwen2.5"})
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == "body.engine" and "cave[vllm]" in detail["msg"]


def test_non_finite_gpus_and_bad_ids_are_422(api_server: ApiServer, tiny_dir: Path) -> None:
    with api_server.client() as admin:
        nan = admin.put(
            f"{MODELS}/nan-gpus",
            content=f'{{"engine": "cpu", "source": "{tiny_dir}", "num_gpus": NaN}}',
            headers={"Content-Type": "application/json"},
        )
        bad_id = admin.put(f"{MODELS}/-leading-dash", json={"engine": "cpu", "source": "/x"})
    assert nan.status_code == 422, nan.text
    assert [d["loc"] for d in nan.json()["error"]["details"]] == ["body.num_gpus"]
    assert bad_id.status_code == 422, bad_id.text
    assert [d["loc"] for d in bad_id.json()["error"]["details"]] == ["path.model_id"]


def test_a_namespace_key_may_not_change_the_registry(
    api_server: ApiServer, tiny_dir: Path, namespace_key: Any
) -> None:
    key = namespace_key(NAMESPACE, ["llm:request"])
    with api_server.client(key) as tenant:
        put = tenant.put(f"{MODELS}/{ADDED}", json={"engine": "cpu", "source": str(tiny_dir)})
        deleted = tenant.delete(f"{MODELS}/{TINY_MODEL}")
        read = tenant.get(MODELS)
    for response in (put, deleted, read):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
    assert listed(api_server, ADDED) is None
