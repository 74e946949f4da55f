"""Two gateway replicas: a key's rate limit is shared by both, a revocation reaches both in 1 s.

A second Serve app ("cave-two" under /two, two ApiIngress replicas) runs beside the session's
API on the same database, so keys issued through the first app work on it. Which replica served
a request shows in the audit log: every replica writes its own file (`audit.<replica>.jsonl`),
and every chat request, served or refused for its rate, is audited there under its key's id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import TINY_MODEL, ApiServer, approved_model_key
from tests.support import poll_until

APP = "cave-two"
PREFIX = "/two"
RPM = 3
NAMESPACE = "replica-team"
REVOCATION_DEADLINE_S = 1.0  # the requirement itself: every replica refuses within 1 s
AFTER_DEADLINE_REQUESTS = 10  # load-balanced over two replicas: both answer some of them


@pytest.fixture(scope="module")
def two(api_server: ApiServer) -> Iterator[str]:
    """The base URL of the second app: two replicas, the session's database."""
    from ray import serve

    from deployments.http.app import build_app

    source = Path(api_server.env["BKG_DB_PATH"]).parent / "tiny"  # built by api_server
    assert (source / "config.json").is_file()
    env = dict(api_server.env)
    models = [{"model_id": TINY_MODEL, "engine": "cpu", "source": str(source)}]
    app = build_app({"env": env, "num_replicas": 2, "models": models})
    serve.run(app, name=APP, route_prefix=PREFIX)
    url = f"{api_server.url}{PREFIX}"
    with httpx.Client(base_url=url, timeout=60) as client:
        poll_until(lambda: client.get("/readyz").status_code == 200, 120, "cave-two ready")
    yield url
    serve.delete(APP)


def issue(api_server: ApiServer) -> dict[str, str]:
    """A fresh model-access key for the tiny model, requested (with RPM requests a minute,
    signed into the key) and approved via the first app."""
    return approved_model_key(api_server, NAMESPACE, TINY_MODEL, asked={"rpm": RPM})


def chat(url: str, key: str) -> httpx.Response:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "X-Cave-Namespace": NAMESPACE},
        json=body,
        timeout=60,
    )


def audited(api_server: ApiServer, token_id: str) -> dict[str, list[str]]:
    """Outcomes of the key's chat events, by the replica log file they were written to."""
    log = Path(api_server.env["CAVE_AUDIT_LOG_PATH"])
    found: dict[str, list[str]] = {}
    for path in log.parent.glob(f"{log.stem}.*{log.suffix}"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("actor") == f"model-key:{token_id}" and event["action"] == "llm.chat":
                found.setdefault(path.name, []).append(event["outcome"])
    return found


def test_the_app_under_a_route_prefix_serves_the_chat_api(api_server: ApiServer, two: str) -> None:
    models = httpx.get(f"{two}/v1/models", timeout=60)
    assert models.status_code == 200
    assert TINY_MODEL in {m["id"] for m in models.json()["data"]}


def test_the_rate_limit_is_shared_by_both_replicas(api_server: ApiServer, two: str) -> None:
    key = issue(api_server)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: chat(two, key["model_access_key"]), range(6)))
    assert sorted(a.status_code for a in answers) == [200] * RPM + [429] * RPM
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60

    def all_six() -> dict[str, list[str]]:
        found = audited(api_server, key["token_id"])
        return found if sum(len(v) for v in found.values()) == 6 else {}

    by_replica = poll_until(all_six, 20, "six audited chat events")
    assert len(by_replica) == 2, by_replica  # both replicas answered, and counted together
    outcomes = sorted(o for v in by_replica.values() for o in v)
    assert outcomes == ["denied"] * RPM + ["ok"] * RPM


def test_a_revocation_reaches_both_replicas_within_a_second(
    api_server: ApiServer, two: str
) -> None:
    key = issue(api_server)
    token = key["model_access_key"]
    assert [chat(two, token).status_code for _ in range(2)] == [200, 200]
    with api_server.client() as admin:  # the first app: cave-two hears of it only by refresh
        revoked = admin.post(
            f"/api/v1/admin/llm/models/{TINY_MODEL}/revoke_key", json={"token_id": key["token_id"]}
        )
    assert revoked.status_code == 204, revoked.text
    deadline = time.monotonic() + REVOCATION_DEADLINE_S
    after_deadline: list[httpx.Response] = []
    while len(after_deadline) < AFTER_DEADLINE_REQUESTS:  # poll: no sleeping
        sent = time.monotonic()
        answer = chat(two, token)
        assert answer.status_code in (200, 403, 429), answer.text
        if sent >= deadline:
            after_deadline.append(answer)
    assert [a.status_code for a in after_deadline] == [403] * AFTER_DEADLINE_REQUESTS
    assert {a.json()["error"]["code"] for a in after_deadline} == {"token_revoked"}
