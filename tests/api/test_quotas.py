"""Per-namespace quotas and node memory admission over real HTTP, with real sandboxes: each quota
is hit for real (set small through the admin route), refused with 429, Retry-After and the quota
named, nothing written, other namespaces unaffected."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import ray

from cave.db import Database, NamespaceRow, SandboxRow
from cave.errors import QuotaExceededError
from config.settings import QuotaSettings, load_settings
from deployments.sandboxes import quotas
from tests.api.conftest import ApiServer, redeploy
from tests.db.conftest import anyio_backend, backend, db, pg_database, target  # noqa: F401
from tests.support import poll_until


def fresh_namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def set_quotas(client: httpx.Client, namespace: str, **quotas: Any) -> dict[str, Any]:
    response = client.put(f"/api/v1/admin/namespaces/{namespace}", json={"quotas": quotas})
    assert response.status_code == 200, response.text
    return dict(response.json())


def create(client: httpx.Client, namespace: str, **body: Any) -> httpx.Response:
    return client.post("/api/v1/sandboxes", json={"namespace": namespace, **body})


def live_ids(client: httpx.Client, namespace: str) -> set[str]:
    page = client.get("/api/v1/sandboxes", params={"namespace": namespace, "limit": 200}).json()
    return {s["id"] for s in page["items"] if s["state"] in ("created", "running")}


def assert_refused(response: httpx.Response, quota: str, limit: float, used: float) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"] == [{"quota": quota, "limit": limit, "used": used}]
    assert quota in error["message"]


def delete_all(client: httpx.Client, namespace: str) -> None:
    for sid in live_ids(client, namespace):
        client.delete(f"/api/v1/sandboxes/{sid}")


def test_the_sandbox_quota_refuses_the_next_and_writes_nothing(api_server: ApiServer) -> None:
    namespace, other = fresh_namespace("q-count"), fresh_namespace("q-other")
    with api_server.client() as admin:
        set_quotas(admin, namespace, sandboxes=2)
        set_quotas(admin, other, sandboxes=2)
        first = create(admin, namespace, name="a")
        second = create(admin, namespace, name="b", start=False)  # a created one holds a place
        assert (first.status_code, second.status_code) == (201, 201), second.text
        before = live_ids(admin, namespace)
        refused = create(admin, namespace, name="c")
        assert_refused(refused, "sandboxes", 2, 2)
        assert live_ids(admin, namespace) == before  # nothing written
        assert create(admin, other, name="elsewhere").status_code == 201  # unaffected
        shown = admin.get(f"/api/v1/admin/namespaces/{namespace}").json()
        assert shown["quotas"]["sandboxes"] == 2 and shown["overrides"]["sandboxes"] == 2
        assert shown["quotas"]["concurrent_execs"] == 64  # the default, filled in
        assert shown["usage"]["sandboxes"] == 2
        # A stopped sandbox frees its place; starting it again is admitted anew.
        stopped = admin.post(f"/api/v1/sandboxes/{first.json()['id']}/stop")
        assert stopped.json()["state"] == "stopped"
        assert create(admin, namespace, name="d").status_code == 201
        restart = admin.post(f"/api/v1/sandboxes/{first.json()['id']}/start")
        assert_refused(restart, "sandboxes", 2, 2)
        assert admin.get(f"/api/v1/sandboxes/{first.json()['id']}").json()["state"] == "stopped"
        delete_all(admin, namespace)
        delete_all(admin, other)


def test_memory_and_cpu_quotas_count_the_limits_of_live_sandboxes(api_server: ApiServer) -> None:
    namespace = fresh_namespace("q-mem")
    with api_server.client() as admin:
        set_quotas(admin, namespace, memory_mb=300, cpu=1.5)
        assert create(admin, namespace, limits={"memory_mb": 200, "cpu": 1}).status_code == 201
        too_much = create(admin, namespace, limits={"memory_mb": 200, "cpu": 0.5})
        assert_refused(too_much, "memory_mb", 300, 200)
        cpu = create(admin, namespace, limits={"memory_mb": 100, "cpu": 1})
        assert_refused(cpu, "cpu", 1.5, 1)
        assert create(admin, namespace, limits={"memory_mb": 100, "cpu": 0.5}).status_code == 201
        delete_all(admin, namespace)


def test_concurrent_creates_never_overshoot(api_server: ApiServer) -> None:
    namespace = fresh_namespace("q-race")
    with api_server.client() as admin:
        set_quotas(admin, namespace, sandboxes=3)

    def one(i: int) -> int:
        with api_server.client() as client:
            return create(client, namespace, name=f"r{i}", start=False).status_code

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(one, range(10)))
    assert sorted(codes) == [201] * 3 + [429] * 7
    with api_server.client() as admin:
        assert len(live_ids(admin, namespace)) == 3
        delete_all(admin, namespace)


def test_the_exec_quota_refuses_an_exec_over_it(api_server: ApiServer) -> None:
    namespace = fresh_namespace("q-exec")
    with api_server.client() as admin:
        set_quotas(admin, namespace, concurrent_execs=1)
        sid = create(admin, namespace).json()["id"]
        url = f"/api/v1/sandboxes/{sid}/exec"
        body = {"command": "echo go; sleep 3"}
        headers = {"Accept": "application/x-ndjson"}
        with admin.stream("POST", url, json=body, headers=headers) as holding:
            assert holding.status_code == 200
            lines = holding.iter_lines()
            assert json.loads(next(lines))["data"] == "go\n"  # it runs: it holds the one slot
            assert_refused(admin.post(url, json={"command": "true"}), "concurrent_execs", 1, 1)
            streamed = admin.post(url, json={"command": "true"}, headers=headers)
            assert_refused(streamed, "concurrent_execs", 1, 1)  # a stream is refused up front
            assert json.loads(list(lines)[-1])["type"] == "result"
        ran = admin.post(url, json={"command": "echo ok"})
        assert ran.status_code == 200 and ran.json()["stdout"] == "ok\n"
        delete_all(admin, namespace)


def test_bad_quotas_are_refused_and_only_admins_set_them(
    api_server: ApiServer, namespace_key: Any
) -> None:
    namespace = fresh_namespace("q-bad")
    with api_server.client() as admin:
        for bad in ({"sandboxes": -1}, {"cpu": "lots"}, {"memory": 5}, {"sandboxes": 10**9}):
            response = admin.put(f"/api/v1/admin/namespaces/{namespace}", json={"quotas": bad})
            assert response.status_code == 422, response.text
        assert admin.get("/api/v1/admin/namespaces/q-none-such").status_code == 404
        # The pool stays as it is when only quotas change, and the other way round.
        admin.put(f"/api/v1/admin/namespaces/{namespace}", json={"pool": "trusted"})
        shown = set_quotas(admin, namespace, sandboxes=5)
        assert (shown["pool"], shown["overrides"]["sandboxes"]) == ("trusted", 5)
        again = admin.put(f"/api/v1/admin/namespaces/{namespace}", json={"pool": None}).json()
        assert (again["pool"], again["overrides"]["sandboxes"]) == (None, 5)
    key = namespace_key(namespace, ["sandboxes:write", "sandboxes:read", "keys:write"])
    with api_server.client(key) as tenant:
        raised = tenant.put(f"/api/v1/admin/namespaces/{namespace}", json={"quotas": {}})
        assert raised.status_code == 403
        assert tenant.get(f"/api/v1/admin/namespaces/{namespace}").status_code == 403


def test_a_sandbox_created_without_ttl_gets_the_defaults(api_server: ApiServer) -> None:
    with api_server.client() as admin:
        created = admin.post("/api/v1/sandboxes", json={"name": "no-ttl"}).json()
        assert created["idle_timeout_s"] == 900
        started = datetime.fromisoformat(created["started_at"])
        expires = datetime.fromisoformat(created["expires_at"])
        assert expires - started == timedelta(seconds=3600)
        asked = admin.post("/api/v1/sandboxes", json={"ttl_s": 60, "idle_timeout_s": 5}).json()
        assert asked["idle_timeout_s"] == 5
        expires = datetime.fromisoformat(asked["expires_at"])
        assert expires - datetime.fromisoformat(asked["started_at"]) == timedelta(seconds=60)
        for sid in (created["id"], asked["id"]):
            admin.delete(f"/api/v1/sandboxes/{sid}")


# -- settings of the test app: a tiny default idle timeout, a huge ceiling on memory --------


@pytest.fixture(scope="module")
def tuned(api_server: ApiServer) -> Iterator[ApiServer]:
    env = {**api_server.env, "CAVE_DEFAULT_IDLE_TIMEOUT_S": "1", "CAVE_MAX_MEMORY_MB": "1048576"}
    redeploy(api_server, env)
    try:
        yield api_server
    finally:
        redeploy(api_server, api_server.env)


def test_an_idle_sandbox_is_stopped_by_the_default_idle_timeout(tuned: ApiServer) -> None:
    with tuned.client() as admin:
        created = admin.post("/api/v1/sandboxes", json={"name": "idle-default"}).json()
        assert created["idle_timeout_s"] == 1
        sid = created["id"]

        def stopped() -> bool:
            return bool(admin.get(f"/api/v1/sandboxes/{sid}").json()["state"] == "stopped")

        poll_until(stopped, 30, "idle sandbox stopped", every_s=0.1)
        admin.delete(f"/api/v1/sandboxes/{sid}")


def test_a_sandbox_bigger_than_any_node_is_refused(tuned: ApiServer) -> None:
    namespace = fresh_namespace("q-big")
    biggest = max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"])
    overcommit = load_settings({}).placement.memory_overcommit  # the default's
    memory_mb = int(biggest * overcommit / 2**20) + 1  # above memory x the overcommit
    with tuned.client() as admin:
        set_quotas(admin, namespace, memory_mb=10 * memory_mb)  # the node refuses, not the quota
        refused = create(admin, namespace, limits={"memory_mb": memory_mb})
        assert refused.status_code == 429, refused.text
        assert "Retry-After" in refused.headers
        error = refused.json()["error"]
        assert error["code"] == "capacity" and error["details"][0]["quota"] == "node_memory"
        assert live_ids(admin, namespace) == set()  # nothing written
        fits = create(admin, namespace, limits={"memory_mb": 256})
        assert fits.status_code == 201, fits.text
        delete_all(admin, namespace)


# -- the admission check itself on both databases, under concurrent transactions ----------


@pytest.mark.anyio
async def test_concurrent_admissions_never_overshoot_on_either_database(
    db: Database,  # noqa: F811 (the fixture of tests/db)
) -> None:
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="ns-q", name="ns-q", quota_sandboxes=3))
    limits = load_settings(env={}).defaults

    async def one(i: int) -> bool:
        try:
            async with db.namespace_session("ns-q") as session:
                await quotas.admit(session, "ns-q", limits, QuotaSettings())
                session.add(SandboxRow(id=f"q{i}", namespace_id="ns-q", name="", state="created"))
        except QuotaExceededError:
            return False
        return True

    admitted = await asyncio.gather(*(one(i) for i in range(12)))
    assert sum(admitted) == 3
    async with db.read_session("ns-q") as session:
        assert (await quotas.usage(session, "ns-q")).sandboxes == 3
