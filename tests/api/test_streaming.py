"""Streamed exec over real HTTP: NDJSON and SSE chunks as they happen, WebSocket with live stdin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.api.conftest import ApiServer

TICKING = "for i in 1 2 3; do echo $i; sleep 0.3; done; echo warn >&2; exit 4"


@pytest.fixture(scope="module")
def sandbox_id(api_server: ApiServer) -> Iterator[str]:
    with api_server.client() as client:
        created = client.post("/api/v1/sandboxes", json={"name": "streaming"})
        assert created.status_code == 201, created.text
        sid = str(created.json()["id"])
        yield sid
        client.delete(f"/api/v1/sandboxes/{sid}")


def read_events(response: httpx.Response, parse: Any) -> list[tuple[int, dict[str, Any]]]:
    """Events with the index of the network read that completed them: a later read means the
    event reached the client later, without comparing any durations."""
    events: list[tuple[int, dict[str, Any]]] = []
    buffer = b""
    for read, chunk in enumerate(response.iter_raw()):
        buffer += chunk
        complete, buffer = parse(buffer)
        events.extend((read, event) for event in complete)
    assert buffer.strip() == b"", buffer
    return events


def split_ndjson(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    *lines, rest = buffer.split(b"\n")
    return [json.loads(line) for line in lines if line.strip()], rest


def split_sse(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    *frames, rest = buffer.split(b"\n\n")
    events = []
    for frame in frames:
        fields = dict(line.split(": ", 1) for line in frame.decode().splitlines())
        event = json.loads(fields["data"])
        assert fields["event"] == event["type"]
        events.append(event)
    return events, rest


def assert_streamed(events: list[tuple[int, dict[str, Any]]]) -> None:
    kinds = [event["type"] for _, event in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1, kinds
    stdout = [(read, e["data"]) for read, e in events if e["type"] == "stdout"]
    assert "".join(data for _, data in stdout) == "1\n2\n3\n"
    assert "".join(e["data"] for _, e in events if e["type"] == "stderr") == "warn\n"
    result_read, result = events[-1]
    first_read = stdout[0][0]
    assert first_read < result_read, events  # the first line came before the command ended
    assert result["result"]["exit_code"] == 4
    assert result["result"]["execution_id"]
    assert result["result"]["stdout"] == "" and result["result"]["stderr"] == ""


def test_ndjson_stream(api_server: ApiServer, sandbox_id: str) -> None:
    with (
        api_server.client() as client,
        client.stream(
            "POST",
            f"/api/v1/sandboxes/{sandbox_id}/exec",
            json={"command": TICKING},
            headers={"Accept": "application/x-ndjson"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert response.headers["x-request-id"]
        assert_streamed(read_events(response, split_ndjson))


def test_sse_stream(api_server: ApiServer, sandbox_id: str) -> None:
    with (
        api_server.client() as client,
        client.stream(
            "POST",
            f"/api/v1/sandboxes/{sandbox_id}/exec",
            json={"command": TICKING},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert_streamed(read_events(response, split_sse))


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
def test_stream_on_unknown_sandbox_is_plain_404(api_server: ApiServer, accept: str) -> None:
    with api_server.client() as client:
        response = client.post(
            "/api/v1/sandboxes/nosuchsandbox/exec",
            json={"command": "true"},
            headers={"Accept": accept},
        )
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "sandbox_not_found"


def ws_url(api_server: ApiServer, sandbox_id: str) -> str:
    return api_server.url.replace("http://", "ws://") + f"/api/v1/sandboxes/{sandbox_id}/exec/ws"


def receive(ws: ClientConnection) -> dict[str, Any]:
    message = ws.recv(timeout=30)
    event: dict[str, Any] = json.loads(message)
    return event


def receive_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Messages up to and including the first of this type."""
    events = [receive(ws)]
    while events[-1]["type"] not in (kind, "error"):
        events.append(receive(ws))
    assert events[-1]["type"] == kind, events
    return events


def stdout_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e["type"] == "stdout")


def test_websocket_live_stdin(api_server: ApiServer, sandbox_id: str) -> None:
    headers = {"Authorization": f"Bearer {api_server.admin_key}"}
    with connect(ws_url(api_server, sandbox_id), additional_headers=headers) as ws:
        ws.send(json.dumps({"command": "cat"}))
        ws.send(json.dumps({"type": "stdin", "data": "hello\n"}))
        echoed = receive_until(ws, "stdout")
        assert stdout_of(echoed) == "hello\n"
        ws.send(json.dumps({"type": "stdin", "data": "again\n"}))
        assert stdout_of(receive_until(ws, "stdout")) == "again\n"
        ws.send(json.dumps({"type": "stdin_close"}))
        ended = receive_until(ws, "result")
        assert stdout_of(ended) == ""
        assert ended[-1]["result"]["exit_code"] == 0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert ws.close_code == 1000


def test_websocket_key_in_query_and_stdin_in_request(
    api_server: ApiServer, sandbox_id: str
) -> None:
    url = f"{ws_url(api_server, sandbox_id)}?access_token={api_server.admin_key}"
    with connect(url) as ws:
        ws.send(json.dumps({"command": "cat; echo done", "stdin": "first\n"}))
        ws.send(json.dumps({"type": "stdin_close"}))
        events = receive_until(ws, "result")
        assert stdout_of(events) == "first\ndone\n"
        assert events[-1]["result"]["exit_code"] == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer cave_live_abcdefghijkl_" + "A" * 43}],
    ids=["no-key", "unknown-key"],
)
def test_websocket_auth_failure_closes_1008(
    api_server: ApiServer, sandbox_id: str, headers: dict[str, str]
) -> None:
    with connect(ws_url(api_server, sandbox_id), additional_headers=headers) as ws:
        # The key is checked before the first message is read: nothing to send.
        error = receive(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == "unauthorized"
        assert error["error"]["request_id"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert ws.close_code == 1008


def test_websocket_unknown_sandbox_is_an_error_event(api_server: ApiServer) -> None:
    headers = {"Authorization": f"Bearer {api_server.admin_key}"}
    with connect(ws_url(api_server, "nosuchsandbox"), additional_headers=headers) as ws:
        ws.send(json.dumps({"command": "true"}))
        error = receive(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "sandbox_not_found")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert ws.close_code == 1011
