"""The one JSON error shape over HTTP: status codes, codes, request ids, no 500 for bad input."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deployments.sandboxes.ops import MAX_FILE_BYTES
from tests.api.conftest import ApiServer


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is the JSON error shape with this status (and code), its id in the header."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert (
        {"code", "message", "request_id"}
        <= set(error)
        <= {
            "code",
            "message",
            "request_id",
            "details",
        }
    )
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def sandbox_id(api_server: ApiServer) -> Iterator[str]:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "errors"})
        assert created.status_code == 201, created.text
        sid = str(created.json()["id"])
        yield sid
        client.delete(f"/api/v1/sandboxes/{sid}")


def test_status_codes_share_one_shape(api_server: ApiServer, sandbox_id: str) -> None:
    reader = None
    with api_server.client() as admin:
        made = admin.post(
            "/api/v1/auth/keys", json={"namespace": unique("err"), "scopes": ["sandboxes:read"]}
        )
        reader = made.json()["key"]
        assert_error(admin.get("/api/v1/sandboxes", params={"cursor": "!!"}), 400)
        assert_error(admin.get("/api/v1/sandboxes/nosuch"), 404, "sandbox_not_found")
        assert_error(admin.get("/api/v1/no/such/route"), 404, "not_found")
        assert_error(admin.patch("/api/v1/sandboxes"), 405, "method_not_allowed")
        assert_error(admin.post("/api/v1/sandboxes", json={"nme": "typo"}), 422, "validation_error")
    with httpx.Client(base_url=api_server.url) as anonymous:
        assert_error(anonymous.get("/api/v1/sandboxes"), 401, "unauthorized")
    with api_server.client(reader) as client:
        assert_error(client.post("/api/v1/sandboxes", json={}), 403, "forbidden")


def test_every_response_carries_a_request_id(api_server: ApiServer, sandbox_id: str) -> None:
    with api_server.client() as client:
        responses = [
            client.get("/healthz"),
            client.get("/readyz"),
            client.get("/openapi.json"),
            client.get(f"/api/v1/sandboxes/{sandbox_id}"),
            client.put(f"/api/v1/sandboxes/{sandbox_id}/files/id.txt", content=b"x"),
            client.delete(f"/api/v1/sandboxes/{sandbox_id}/files/id.txt"),
            client.get("/api/v1/sandboxes/nosuch"),
        ]
        ids = [r.headers.get("x-request-id") for r in responses]
        assert all(ids), [(r.request.url, r.status_code) for r in responses]
        assert len(set(ids)) == len(ids)  # one per request
        assert responses[4].status_code == 200 and responses[5].status_code == 204


def test_client_request_id_is_echoed(api_server: ApiServer) -> None:
    with api_server.client() as client:
        sane = f"trace-{secrets.token_hex(8)}:1.a_b"
        ok = client.get("/healthz", headers={"X-Request-Id": sane})
        assert ok.headers["x-request-id"] == sane
        failed = client.get("/api/v1/sandboxes/nosuch", headers={"X-Request-Id": sane})
        assert assert_error(failed, 404)["request_id"] == sane
        # A value unfit for logs is not taken as the request's id.
        for insane in ("has spaces in it", "x" * 300, 'quote"d', "semi;colon"):
            response = client.get("/api/v1/sandboxes/nosuch", headers={"X-Request-Id": insane})
            assert response.status_code == 404
            assert response.json()["error"]["request_id"] not in ("", insane)


def test_limit_above_maximum_is_400(api_server: ApiServer) -> None:
    with api_server.client() as client:
        for limits in ({"memory_mb": 10**9}, {"pids": 10**9}, {"timeout_s": 10.0**9}):
            response = client.post("/api/v1/sandboxes", json={"limits": limits, "name": "big"})
            error = assert_error(response, 400, "limit_exceeded")
            assert next(iter(limits)) in error["message"]
        names = {s["name"] for s in client.get("/api/v1/sandboxes").json()["items"]}
    assert "big" not in names  # refused before anything was recorded


def test_schema_violations_are_422_with_field_paths(api_server: ApiServer, sandbox_id: str) -> None:
    with api_server.client() as client:
        bad_type = client.post("/api/v1/sandboxes", json={"limits": {"memory_mb": "lots"}})
        paths = [d["loc"] for d in assert_error(bad_type, 422, "validation_error")["details"]]
        assert any(p.endswith("limits.memory_mb") for p in paths), paths
        negative = client.post("/api/v1/sandboxes", json={"limits": {"memory_mb": -1}})
        paths = [d["loc"] for d in assert_error(negative, 422)["details"]]
        assert any(p.endswith("limits.memory_mb") for p in paths), paths
        unknown = client.post("/api/v1/sandboxes", json={"name": "x", "colour": "red"})
        paths = [d["loc"] for d in assert_error(unknown, 422, "validation_error")["details"]]
        assert any(p.endswith("colour") for p in paths), paths
        nested = client.post("/api/v1/sandboxes", json={"limits": {"gpus": 1}})
        paths = [d["loc"] for d in assert_error(nested, 422)["details"]]
        assert any(p.endswith("limits.gpus") for p in paths), paths
        no_command = client.post(f"/api/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "ls"})
        paths = [d["loc"] for d in assert_error(no_command, 422)["details"]]
        assert any(p.endswith("command") for p in paths) and any(p.endswith("cmd") for p in paths)
        bad_query = client.get("/api/v1/sandboxes", params={"limit": 0})
        paths = [d["loc"] for d in assert_error(bad_query, 422)["details"]]
        assert paths == ["query.limit"]


def test_bad_cursor_is_400(api_server: ApiServer) -> None:
    with api_server.client() as client:
        for cursor in ("not-a-cursor", "e30", "WyJ4IiwgInkiXQ", "%%%"):
            response = client.get("/api/v1/sandboxes", params={"cursor": cursor})
            assert_error(response, 400, "invalid_argument")


def test_exec_on_stopped_sandbox_is_409(api_server: ApiServer) -> None:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "to-stop"}).json()
        sid = created["id"]
        assert client.post(f"/api/v1/sandboxes/{sid}/stop").json()["state"] == "stopped"
        ran = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert_error(ran, 409, "sandbox_state")
        written = client.put(f"/api/v1/sandboxes/{sid}/files/a.txt", content=b"a")
        assert_error(written, 409, "sandbox_state")
        never = client.post("/api/v1/sandboxes", json={"name": "never", "start": False}).json()
        ran = client.post(f"/api/v1/sandboxes/{never['id']}/exec", json={"command": "true"})
        assert_error(ran, 409, "sandbox_state")
        for done in (sid, never["id"]):
            assert client.delete(f"/api/v1/sandboxes/{done}").status_code == 204


def test_path_escape_is_400(api_server: ApiServer, sandbox_id: str) -> None:
    base = f"/api/v1/sandboxes/{sandbox_id}/files"
    # Encoded slashes: a client (httpx too) would otherwise resolve the dots before sending.
    escapes = ["..%2Fetc%2Fpasswd", "a%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"]
    with api_server.client() as client:
        for path in escapes:
            assert_error(client.get(f"{base}/{path}"), 400, "invalid_path")
            assert_error(client.put(f"{base}/{path}", content=b"x"), 400, "invalid_path")
            assert_error(client.delete(f"{base}/{path}"), 400, "invalid_path")
        for path in ("../etc", "/etc", "../.."):
            assert_error(client.get(base, params={"path": path}), 400, "invalid_path")


def test_file_over_the_limit_is_413(api_server: ApiServer, sandbox_id: str) -> None:
    url = f"/api/v1/sandboxes/{sandbox_id}/files/big.bin"
    with api_server.client() as client:
        too_big = client.put(url, content=b"\0" * (MAX_FILE_BYTES + 1))
        assert_error(too_big, 413, "payload_too_large")
        # Chunked, with no length announced: refused once the bytes read pass the limit.
        piece = b"\0" * (1024 * 1024)
        chunks = (piece for _ in range(MAX_FILE_BYTES // len(piece) + 1))
        assert_error(client.put(url, content=chunks), 413, "payload_too_large")
        listed = client.get(f"/api/v1/sandboxes/{sandbox_id}/files").json()["entries"]
        assert "big.bin" not in {entry["name"] for entry in listed}
        stdin = client.post(
            f"/api/v1/sandboxes/{sandbox_id}/exec",
            json={"command": "wc -c", "stdin": "x" * (8 * 1024 * 1024 + 1)},
        )
        assert_error(stdin, 413, "payload_too_large")


GARBAGE_BODIES: list[bytes] = [
    b"",
    b"not json",
    b"{",
    b"[]",
    b"null",
    b"42",
    b'"str"',
    b'{"command": null}',
    b'{"command": []}',
    b'{"command": [""]}',
    b'{"command": "   "}',
    b'{"command": [1, 2]}',
    b'{"command": "true", "env": {"A": 1}}',
    b'{"command": "true", "env": {"A\\u0000B": "x"}}',
    b'{"command": "true", "env": {"": "x"}}',
    b'{"command": "true", "env": {"A=B": "x"}}',
    b'{"command": "echo \\u0000"}',
    b'{"command": ["echo\\u0000x"]}',
    b'{"command": "true", "cwd": "../.."}',
    b'{"command": "true", "cwd": "/etc"}',
    b'{"command": "true", "cwd": "no\\u0000pe"}',
    b'{"command": "true", "timeout_s": -1}',
    b'{"command": "true", "timeout_s": 1e308}',
    b'{"command": "true", "timeout_s": "NaN"}',
    b'{"name": "\\ud800"}',
    b'{"limits": {"memory_mb": 1e400}}',
    b'{"limits": {"cpu": "Infinity"}}',
    b'{"labels": {"a": 1}}',
    b'{"namespace": "UPPER"}',
    b'{"ttl_s": 0}',
    b'{"scopes": ["root"]}',
    b'{"kind": "god"}',
    b'{"grace_s": -5}',
    b'{"grace_s": 1e300}',
    b'{"ttl_s": 1e300}',
    b'{"namespace": "ns", "scopes": ["sandboxes:read"], "ttl_s": 1e300}',
    b'{"command": "true", "timeout_s": 1e300}',
    b'{"command": "true", "cwd": "' + b"d/" * 3000 + b'"}',
    b'{"a": ' * 200 + b"1" + b"}" * 200,
    b"\xff\xfe\x00garbage",
]
GARBAGE_PATHS = [
    "files/%00",
    "files/a%00b",
    "files/" + "a" * 5000,
    "files/" + "a/" * 600,
    "files/%ff%fe",
    "files/~root",
    "files/.",
    "files/%2e%2e/%2e%2e/etc/passwd",
    "files?path=%00",
    "files?path=" + "b" * 5000,
]


def test_garbage_is_never_a_500(api_server: ApiServer, sandbox_id: str) -> None:
    targets = [
        "/api/v1/sandboxes",
        f"/api/v1/sandboxes/{sandbox_id}/exec",
        "/api/v1/auth/keys",
        "/api/v1/auth/keys/nosuchkey0000/rotate",
    ]
    with api_server.client() as client:
        for url in targets:
            for body in GARBAGE_BODIES:
                response = client.post(
                    url, content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code < 500, (url, body[:60], response.text)
                if response.status_code >= 400:
                    assert_error(response, response.status_code)
        base = f"/api/v1/sandboxes/{sandbox_id}"
        for path in GARBAGE_PATHS:
            for method in ("GET", "PUT", "DELETE"):
                response = client.request(method, f"{base}/{path}", content=b"x")
                assert response.status_code < 500, (method, path[:60], response.text)
                if response.status_code >= 400:
                    assert_error(response, response.status_code)
        for sid in ("%00", "a" * 3000, "%ff", "..", "'; drop table sandboxes;--"):
            response = client.get(f"/api/v1/sandboxes/{sid}")
            assert_error(response, 404)
        assert client.get(f"{base}").json()["state"] == "running"
