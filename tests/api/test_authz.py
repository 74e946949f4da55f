"""Who may do what, over real HTTP: 401 for bad keys, 403 for missing scopes, 404 across tenants."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.api.conftest import ApiServer

NamespaceKey = Callable[[str, list[str]], str]
ALL_SANDBOX = ["sandboxes:read", "sandboxes:write"]
ALL_SCOPES = [*ALL_SANDBOX, "keys:read", "keys:write"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # `{sid}` stands for the sandbox's id
    body: dict[str, Any] | None = None

    def call(self, client: httpx.Client, sandbox_id: str) -> httpx.Response:
        return client.request(self.method, self.path.format(sid=sandbox_id), json=self.body)


CREATE = Route("POST", "/api/v1/sandboxes", {"start": False})
GET = Route("GET", "/api/v1/sandboxes/{sid}")
LIST = Route("GET", "/api/v1/sandboxes")
EXEC = Route("POST", "/api/v1/sandboxes/{sid}/exec", {"command": "echo hi"})
READ_FILE = Route("GET", "/api/v1/sandboxes/{sid}/files/hello.txt")
WRITE_FILE = Route("PUT", "/api/v1/sandboxes/{sid}/files/other.txt")
STOP = Route("POST", "/api/v1/sandboxes/{sid}/stop")
DELETE = Route("DELETE", "/api/v1/sandboxes/{sid}")
KEYS_LIST = Route("GET", "/api/v1/auth/keys")
KEYS_CREATE = Route("POST", "/api/v1/auth/keys", {"scopes": ["sandboxes:read"]})
# The routes whose authentication is checked; none of them changes anything once refused.
REPRESENTATIVE = [CREATE, GET, LIST, EXEC, READ_FILE, STOP, KEYS_LIST, KEYS_CREATE]


@dataclass(frozen=True)
class Tenant:
    namespace: str
    sandbox_id: str  # a running sandbox of this namespace, with /workspace/hello.txt


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return str(body["error"]["code"])


def create_key(api_server: ApiServer, namespace: str, scopes: list[str]) -> dict[str, Any]:
    with api_server.client() as admin:
        response = admin.post("/api/v1/auth/keys", json={"namespace": namespace, "scopes": scopes})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


@pytest.fixture(scope="module")
def tenant(api_server: ApiServer) -> Iterator[Tenant]:
    namespace = unique("authz")
    with api_server.client() as admin:
        created = admin.post("/api/v1/sandboxes", json={"namespace": namespace, "name": "t"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        written = admin.put(f"/api/v1/sandboxes/{sandbox_id}/files/hello.txt", content=b"hi")
        assert written.status_code == 200, written.text
        yield Tenant(namespace, sandbox_id)
        admin.delete(f"/api/v1/sandboxes/{sandbox_id}")


def headers_client(api_server: ApiServer, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=api_server.url, headers=headers, timeout=60.0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-cave-key"},
        {"Authorization": "cave_live_abcdefghijkl_" + "A" * 43},
    ],
    ids=["no-key", "basic", "empty-bearer", "garbage-bearer", "no-scheme"],
)
def test_missing_or_malformed_key_is_401(
    api_server: ApiServer, tenant: Tenant, headers: dict[str, str]
) -> None:
    with headers_client(api_server, headers) as client:
        for route in REPRESENTATIVE:
            response = route.call(client, tenant.sandbox_id)
            assert response.status_code == 401, (route, response.text)
            assert error_code(response) == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_key_is_401(api_server: ApiServer, tenant: Tenant) -> None:
    real = api_server.admin_key
    unknown_id = real[: len("cave_live_")] + "a" * 12 + real[len("cave_live_") + 12 :]
    wrong_secret = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    for key in (unknown_id, wrong_secret):
        with api_server.client(key) as client:
            for route in REPRESENTATIVE:
                response = route.call(client, tenant.sandbox_id)
                assert response.status_code == 401, (route, response.text)
                assert error_code(response) == "unauthorized"


def test_revoked_key_is_401(api_server: ApiServer, tenant: Tenant) -> None:
    key = create_key(api_server, tenant.namespace, ALL_SCOPES)
    with api_server.client(key["key"]) as client:
        assert GET.call(client, tenant.sandbox_id).status_code == 200
        with api_server.client() as admin:
            assert admin.delete(f"/api/v1/auth/keys/{key['id']}").status_code == 204
        for route in REPRESENTATIVE:
            response = route.call(client, tenant.sandbox_id)
            assert response.status_code == 401, (route, response.text)
    with api_server.client() as admin:
        listed = admin.get("/api/v1/auth/keys", params={"namespace": tenant.namespace}).json()
    revoked = next(k for k in listed["items"] if k["id"] == key["id"])
    assert revoked["revoked_at"] is not None


def test_rotated_key_stops_working_after_its_grace(api_server: ApiServer, tenant: Tenant) -> None:
    old = create_key(api_server, tenant.namespace, ALL_SCOPES)
    with api_server.client(old["key"]) as client:
        assert GET.call(client, tenant.sandbox_id).status_code == 200
    with api_server.client() as admin:
        rotated = admin.post(f"/api/v1/auth/keys/{old['id']}/rotate", json={"grace_s": 0})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["rotated_from_id"] == old["id"] and new["key"] != old["key"]
    with api_server.client(old["key"]) as client:
        for route in REPRESENTATIVE:
            response = route.call(client, tenant.sandbox_id)
            assert response.status_code == 401, (route, response.text)
    with api_server.client(new["key"]) as client:
        assert GET.call(client, tenant.sandbox_id).json()["id"] == tenant.sandbox_id
        assert READ_FILE.call(client, tenant.sandbox_id).content == b"hi"


def test_other_namespace_sandbox_is_404(api_server: ApiServer, tenant: Tenant) -> None:
    stranger = create_key(api_server, unique("authz-other"), ALL_SCOPES)["key"]
    with api_server.client(stranger) as client:
        for route in (GET, EXEC, READ_FILE, WRITE_FILE, STOP, DELETE):
            response = route.call(client, tenant.sandbox_id)
            assert response.status_code == 404, (route, response.text)
            assert error_code(response) == "sandbox_not_found"
            # The same answer as for an id that exists nowhere: nothing leaks.
            missing = route.call(client, "nosuchsandbox")
            assert (missing.status_code, error_code(missing)) == (404, "sandbox_not_found")
        listed = client.get(f"/api/v1/sandboxes/{tenant.sandbox_id}/files")
        assert listed.status_code == 404
    with api_server.client() as admin:
        after = admin.get(f"/api/v1/sandboxes/{tenant.sandbox_id}").json()
        assert after["state"] == "running"  # the stranger's stop and delete did nothing
        files = admin.get(f"/api/v1/sandboxes/{tenant.sandbox_id}/files").json()["entries"]
        assert "other.txt" not in {entry["name"] for entry in files}  # nor did its write


def test_missing_scope_is_403(api_server: ApiServer, tenant: Tenant) -> None:
    reader = create_key(api_server, tenant.namespace, ["sandboxes:read"])["key"]
    writer = create_key(api_server, tenant.namespace, ["sandboxes:write"])["key"]
    refused = {
        reader: [CREATE, EXEC, WRITE_FILE, STOP, DELETE, KEYS_LIST, KEYS_CREATE],
        writer: [GET, LIST, READ_FILE, KEYS_LIST, KEYS_CREATE],
    }
    for key, routes in refused.items():
        with api_server.client(key) as client:
            for route in routes:
                response = route.call(client, tenant.sandbox_id)
                assert response.status_code == 403, (route, response.text)
                assert error_code(response) == "forbidden"
    with api_server.client(reader) as client:
        assert GET.call(client, tenant.sandbox_id).status_code == 200
        assert READ_FILE.call(client, tenant.sandbox_id).content == b"hi"
    with api_server.client(writer) as client:
        ran = EXEC.call(client, tenant.sandbox_id)
        assert (ran.status_code, ran.json()["stdout"]) == (200, "hi\n")
    with api_server.client() as admin:
        assert admin.get(f"/api/v1/sandboxes/{tenant.sandbox_id}").json()["state"] == "running"


def test_list_shows_own_namespace_and_admin_sees_all(api_server: ApiServer, tenant: Tenant) -> None:
    other_namespace = unique("authz-list")
    other_key = create_key(api_server, other_namespace, ALL_SANDBOX)["key"]
    own_key = create_key(api_server, tenant.namespace, ALL_SANDBOX)["key"]
    with api_server.client(other_key) as client:
        created = client.post("/api/v1/sandboxes", json={"start": False, "name": "other"})
        assert created.status_code == 201, created.text
        assert created.json()["namespace"] == other_namespace
        other_id = created.json()["id"]
        listed = client.get("/api/v1/sandboxes", params={"limit": 200}).json()["items"]
        assert [s["id"] for s in listed] == [other_id]
        # Asking for another namespace by name does not widen the view.
        asked = client.get("/api/v1/sandboxes", params={"namespace": tenant.namespace}).json()
        assert asked["items"] == []
    with api_server.client(own_key) as client:
        listed = client.get("/api/v1/sandboxes", params={"limit": 200}).json()["items"]
        assert {s["namespace"] for s in listed} == {tenant.namespace}
        assert tenant.sandbox_id in {s["id"] for s in listed}
    with api_server.client() as admin:
        newest = admin.get("/api/v1/sandboxes", params={"limit": 1}).json()["items"]
        assert [s["id"] for s in newest] == [other_id]  # every namespace in one list
        for namespace, sid in ((other_namespace, other_id), (tenant.namespace, tenant.sandbox_id)):
            narrowed = admin.get("/api/v1/sandboxes", params={"namespace": namespace}).json()
            assert [s["id"] for s in narrowed["items"]] == [sid]
        assert admin.delete(f"/api/v1/sandboxes/{other_id}").status_code == 204


def test_namespace_key_cannot_grant_more_than_it_holds(
    api_server: ApiServer, tenant: Tenant
) -> None:
    holder = create_key(api_server, tenant.namespace, ["sandboxes:read", "keys:read", "keys:write"])
    attempts = [
        {"kind": "admin"},
        {"kind": "admin", "scopes": ["keys:write"]},
        {"scopes": ["sandboxes:write"]},
        {"scopes": ["sandboxes:read", "llm:request"]},
        {"namespace": unique("authz-elsewhere"), "scopes": ["sandboxes:read"]},
    ]
    with api_server.client(holder["key"]) as client:
        for body in attempts:
            response = client.post("/api/v1/auth/keys", json=body)
            assert response.status_code == 403, (body, response.text)
            assert error_code(response) == "forbidden"
        granted = client.post("/api/v1/auth/keys", json={"scopes": ["sandboxes:read"]})
        assert granted.status_code == 201, granted.text
        assert granted.json()["namespace"] == tenant.namespace
        assert granted.json()["scopes"] == ["sandboxes:read"]
        listed = client.get("/api/v1/auth/keys").json()["items"]
    assert {k["namespace"] for k in listed} == {tenant.namespace}
    assert {holder["id"], granted.json()["id"]} <= {k["id"] for k in listed}
    assert all("key" not in k for k in listed)  # lists never show a secret


def test_a_sandbox_key_drives_its_sandbox_and_nothing_else(
    api_server: ApiServer, tenant: Tenant
) -> None:
    with api_server.client() as admin:
        created = admin.post("/api/v1/sandboxes", json={"namespace": tenant.namespace})
        assert created.status_code == 201, created.text
    own_id, own_key = created.json()["id"], created.json()["api_key"]
    sibling = tenant.sandbox_id  # a running sandbox of the same namespace
    try:
        with api_server.client(own_key) as client:
            ran = EXEC.call(client, own_id)
            assert (ran.status_code, ran.json()["stdout"]) == (200, "hi\n"), ran.text
            assert client.put(f"/api/v1/sandboxes/{own_id}/files/a.txt", content=b"a").is_success
            assert client.get(f"/api/v1/sandboxes/{own_id}/files/a.txt").content == b"a"
            assert client.get(f"/api/v1/sandboxes/{own_id}/files").status_code == 200
            assert GET.call(client, own_id).json()["id"] == own_id
            refused = [
                EXEC.call(client, sibling),
                READ_FILE.call(client, sibling),
                WRITE_FILE.call(client, sibling),
                GET.call(client, sibling),
                STOP.call(client, sibling),
                DELETE.call(client, sibling),
                LIST.call(client, own_id),
                CREATE.call(client, own_id),
                STOP.call(client, own_id),  # its own lifecycle is its owner's, not its own
                DELETE.call(client, own_id),
                KEYS_LIST.call(client, own_id),
                KEYS_CREATE.call(client, own_id),
                client.post(
                    "/api/v1/llm/requests",
                    json={"model_id": "tiny", "cave_namespace": tenant.namespace},
                ),
            ]
            for response in refused:
                assert response.status_code == 403, (response.request.url, response.text)
                assert error_code(response) == "forbidden"
        with api_server.client() as admin:
            assert admin.get(f"/api/v1/sandboxes/{own_id}").json()["state"] == "running"
            after = admin.get(f"/api/v1/sandboxes/{sibling}").json()
            assert after["state"] == "running"  # the sibling was neither stopped nor deleted
            files = admin.get(f"/api/v1/sandboxes/{sibling}/files").json()["entries"]
            assert "other.txt" not in {entry["name"] for entry in files}
    finally:
        with api_server.client() as admin:
            admin.delete(f"/api/v1/sandboxes/{own_id}")


def test_keys_write_alone_cannot_rotate_a_sandboxes_write_key(
    api_server: ApiServer, tenant: Tenant
) -> None:
    attacker = create_key(api_server, tenant.namespace, ["keys:write"])
    victim = create_key(api_server, tenant.namespace, ["sandboxes:write"])
    with api_server.client(attacker["key"]) as client:
        rotated = client.post(f"/api/v1/auth/keys/{victim['id']}/rotate", json={})
        assert rotated.status_code == 403, rotated.text
        assert error_code(rotated) == "forbidden" and "key" not in rotated.json()
        revoked = client.delete(f"/api/v1/auth/keys/{victim['id']}")
        assert (revoked.status_code, error_code(revoked)) == (403, "forbidden")
    with api_server.client(victim["key"]) as client:
        ran = EXEC.call(client, tenant.sandbox_id)  # the victim's key works as before
        assert (ran.status_code, ran.json()["stdout"]) == (200, "hi\n")
    with api_server.client() as admin:
        listed = admin.get("/api/v1/auth/keys", params={"namespace": tenant.namespace}).json()
    after = next(k for k in listed["items"] if k["id"] == victim["id"])
    assert (after["revoked_at"], after["grace_until"]) == (None, None)
    assert not [k for k in listed["items"] if k["rotated_from_id"] == victim["id"]]
