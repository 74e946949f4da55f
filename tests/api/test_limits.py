"""Bounded inputs over real HTTP: bodies past their limit are 413 before routing and before the
key is checked; a non-streamed exec returns at most the inline cap, the stream all of it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from config.api import MIB
from deployments.http.body_limit import RequestLimits
from deployments.sandboxes.ops import INLINE_OUTPUT_BYTES
from tests.api.conftest import ApiServer
from tests.api.test_errors import assert_error
from tests.api.test_mcp import call, mcp_session

LIMITS = RequestLimits()  # the session's API runs with the defaults
BIG = 10 * MIB
REPEATS = 10  # refusals of one kind in a row
PRINTED = 20 * MIB  # what the exec tests print: far past the inline cap, under output_bytes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def unauthenticated(server: ApiServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120.0)


def pieces(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length): the server sees its size only by counting."""
    for _ in range(total // size):
        yield b" " * size


@pytest.fixture(scope="module")
def loud_sandbox(api_server: ApiServer) -> Iterator[str]:
    """A sandbox that keeps 64 MiB of output per stream, so the inline cap is what cuts."""
    with api_server.client() as client:
        created = client.post(
            "/api/v1/sandboxes", json={"name": "limits", "limits": {"output_bytes": 64 * MIB}}
        )
        assert created.status_code == 201, created.text
        sid = str(created.json()["id"])
        yield sid
        client.delete(f"/api/v1/sandboxes/{sid}")


def test_an_unauthenticated_large_body_is_413_before_the_key_is_checked(
    api_server: ApiServer,
) -> None:
    # The same request with a small body is refused for its missing key: the 413 came first.
    with unauthenticated(api_server) as client:
        assert_error(client.post("/api/v1/sandboxes", json={"name": "x"}), 401)
    declared = b"{" + b" " * BIG + b"}"
    # A connection is closed after a 413 (its body unread): each attempt gets a client of its own.
    with unauthenticated(api_server) as client:
        refused = client.post(
            "/api/v1/sandboxes", content=declared, headers={"content-type": "application/json"}
        )
        error = assert_error(refused, 413, "payload_too_large")
        assert str(LIMITS.json_bytes) in error["message"]
    for path in ("/api/v1/sandboxes/any/exec", "/api/v1/auth/keys/rotated"):
        with unauthenticated(api_server) as client:  # chunked: no Content-Length to go by
            chunked = client.post(
                path, content=pieces(BIG), headers={"content-type": "application/json"}
            )
            assert_error(chunked, 413, "payload_too_large")


def test_an_authenticated_json_body_over_the_limit_is_413(
    api_server: ApiServer, loud_sandbox: str
) -> None:
    with api_server.client() as client:
        too_big = client.post(
            f"/api/v1/sandboxes/{loud_sandbox}/exec",
            json={"command": "cat", "stdin": "x" * (LIMITS.json_bytes + 1)},
        )
        assert_error(too_big, 413, "payload_too_large")
    with api_server.client() as client:  # a new connection: the refused one was closed
        ran = client.post(
            f"/api/v1/sandboxes/{loud_sandbox}/exec",
            json={"command": "wc -c", "stdin": "x" * (LIMITS.json_bytes // 2)},
        )
        assert ran.status_code == 200, ran.text
        assert ran.json()["stdout"].strip() == str(LIMITS.json_bytes // 2)


def test_a_file_upload_streams_up_to_its_own_limit(
    api_server: ApiServer, loud_sandbox: str
) -> None:
    url = f"/api/v1/sandboxes/{loud_sandbox}/files/upload.bin"
    data = bytes(range(256)) * (8 * MIB // 256)  # past the JSON limit, under the file limit
    with api_server.client() as client:
        written = client.put(url, content=iter([data[: 4 * MIB], data[4 * MIB :]]))
        assert written.status_code == 200, written.text
        assert written.json()["size"] == len(data)
        assert client.get(url).content == data
    # Every time, not most times: the server reads and drops the refused body before its 413
    # (a close with unread data sends a reset, which once cost a client the 413's body).
    for _ in range(REPEATS):
        with unauthenticated(api_server) as client:
            over = client.put(url, content=b"\0" * (LIMITS.file_bytes + 1))
            assert_error(over, 413, "payload_too_large")
    with api_server.client() as client:
        chunked = client.put(url, content=pieces(LIMITS.file_bytes + MIB))
        assert_error(chunked, 413, "payload_too_large")
    with api_server.client() as client:
        assert client.get(url).content == data  # the refused upload changed nothing


def test_an_mcp_body_over_its_limit_is_413_json(api_server: ApiServer) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "x" * LIMITS.mcp_bytes}
    with unauthenticated(api_server) as client:
        refused = client.post(
            "/mcp",
            content=json.dumps(message).encode(),
            headers={"content-type": "application/json", "accept": "application/json"},
        )
        assert_error(refused, 413, "payload_too_large")


def test_a_non_streamed_exec_returns_at_most_the_inline_cap(
    api_server: ApiServer, loud_sandbox: str
) -> None:
    command = f"yes abcdefg | head -c {PRINTED}; yes e | head -c {PRINTED} >&2"
    with api_server.client() as client:
        ran = client.post(f"/api/v1/sandboxes/{loud_sandbox}/exec", json={"command": command})
    assert ran.status_code == 200, ran.text
    body = ran.json()
    assert body["truncated"] is True and body["exit_code"] == 0
    assert len(body["stdout"]) == INLINE_OUTPUT_BYTES == LIMITS.exec_output_bytes
    assert body["stdout"] == ("abcdefg\n" * (INLINE_OUTPUT_BYTES // 8 + 1))[:INLINE_OUTPUT_BYTES]
    assert len(body["stderr"]) == INLINE_OUTPUT_BYTES
    # Each newline is two bytes in JSON: the body is bounded by the cap, not by the 40 MiB.
    assert len(ran.content) < 2 * 2 * INLINE_OUTPUT_BYTES + 4096


def test_the_stream_still_returns_all_of_it(api_server: ApiServer, loud_sandbox: str) -> None:
    printed = {"stdout": 0, "stderr": 0}
    result = None
    with (
        api_server.client() as client,
        client.stream(
            "POST",
            f"/api/v1/sandboxes/{loud_sandbox}/exec",
            json={"command": f"yes abcdefg | head -c {PRINTED}"},
            headers={"accept": "application/x-ndjson"},
        ) as streamed,
    ):
        assert streamed.status_code == 200
        for line in streamed.iter_lines():
            event = json.loads(line)
            if event["type"] in printed:
                printed[event["type"]] += len(event["data"])
            elif event["type"] == "result":
                result = event["result"]
    assert printed == {"stdout": PRINTED, "stderr": 0}
    assert result is not None and result["truncated"] is False


@pytest.mark.anyio
async def test_the_mcp_exec_tool_has_the_same_cap(api_server: ApiServer, loud_sandbox: str) -> None:
    async with mcp_session(api_server, api_server.admin_key) as session:
        out = await call(
            session,
            "run_command",
            sandbox_id=loud_sandbox,
            command=f"yes abcdefg | head -c {PRINTED}",
        )
    assert out["truncated"] is True
    assert len(out["stdout"]) == INLINE_OUTPUT_BYTES


def test_a_declared_body_that_never_arrives_still_gets_its_413(api_server: ApiServer) -> None:
    """The replica drains a refused body for a bounded time only: a client that declares a large
    body and sends none, holding the connection open, still gets its whole 413."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(api_server.url)
    head = (
        f"POST /api/v1/sandboxes HTTP/1.1\r\nhost: {url.netloc}\r\n"
        f"content-type: application/json\r\ncontent-length: {LIMITS.json_bytes + 1}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.settimeout(60)  # a deadline for the test, not a figure: the answer comes long before
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            assert chunk, f"closed before the whole answer: {answer!r}"
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"


def _length(response: bytes) -> int:
    """The Content-Length of a response's head."""
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no content-length: {response[:300]!r}")
