"""The MCP endpoint over real HTTP with the `mcp` SDK's own client: tools, lifecycle, keys."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from tests.api.conftest import ApiServer

pytestmark = pytest.mark.anyio

READ_WRITE = ["sandboxes:read", "sandboxes:write"]
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def mcp_session(server: ApiServer, key: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx2.Timeout(60.0, read=300.0)  # creating a sandbox may wait for a spare
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        streamable_http_client(f"{server.url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured result; fails the test on a tool error."""
    result = await session.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    assert not result.is_error, f"{tool} failed: {text_of(result)}"
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool error's `{code, message}`."""
    result = await session.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    assert result.is_error, f"{tool} unexpectedly succeeded: {text_of(result)}"
    assert result.structured_content is not None
    error: dict[str, Any] = result.structured_content["error"]
    assert text_of(result).startswith(f"{error['code']}: ")
    return error


def text_of(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


async def test_list_tools_shows_the_sandbox_tools(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    async with mcp_session(api_server, namespace_key("mcp-tools", READ_WRITE)) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert {
        "create_sandbox",
        "run_command",
        "write_file",
        "read_file",
        "list_files",
        "stop_sandbox",
        "list_sandboxes",
    } <= set(tools)
    for tool in tools.values():
        assert tool.description, f"{tool.name} has no description for the agent"
    assert tools["run_command"].input_schema["required"] == ["sandbox_id", "command"]
    assert tools["read_file"].annotations is not None
    assert tools["read_file"].annotations.read_only_hint is True


async def test_whole_lifecycle(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    async with mcp_session(api_server, namespace_key("mcp-life", READ_WRITE)) as session:
        created = await call(session, "create_sandbox", name="mcp", labels={"via": "mcp"})
        assert created["state"] == "running"
        assert created["namespace"] == "mcp-life"
        sid = created["id"]

        written = await call(
            session, "write_file", sandbox_id=sid, path="notes/hello.txt", content="hello mcp\n"
        )
        assert written == {"path": "notes/hello.txt", "size": 10}
        ran = await call(session, "run_command", sandbox_id=sid, command="cat notes/hello.txt")
        assert (ran["exit_code"], ran["stdout"], ran["timed_out"]) == (0, "hello mcp\n", False)
        failed = await call(session, "run_command", sandbox_id=sid, command=["sh", "-c", "exit 3"])
        assert failed["exit_code"] == 3  # a failing command is a result, not a tool error

        read = await call(session, "read_file", sandbox_id=sid, path="notes/hello.txt")
        assert (read["content"], read["encoding"], read["size"]) == ("hello mcp\n", "utf-8", 10)
        listed = await call(session, "list_files", sandbox_id=sid, path="notes")
        assert [entry["name"] for entry in listed["entries"]] == ["hello.txt"]
        page = await call(session, "list_sandboxes", state="running")
        assert sid in [item["id"] for item in page["items"]]

        stopped = await call(session, "stop_sandbox", sandbox_id=sid)
        assert stopped["state"] == "stopped"
        error = await refused(session, "run_command", sandbox_id=sid, command="true")
        assert error["code"] == "sandbox_state"


async def test_binary_files_travel_as_base64(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    blob = bytes(range(256))
    async with mcp_session(api_server, namespace_key("mcp-bin", READ_WRITE)) as session:
        sid = (await call(session, "create_sandbox"))["id"]
        encoded = base64.b64encode(blob).decode()
        await call(
            session, "write_file", sandbox_id=sid, path="blob", content=encoded, encoding="base64"
        )
        size = await call(session, "run_command", sandbox_id=sid, command="wc -c < blob")
        assert size["stdout"].strip() == "256"
        read = await call(session, "read_file", sandbox_id=sid, path="blob")
        assert read["encoding"] == "base64"
        assert base64.b64decode(read["content"]) == blob
        await call(session, "stop_sandbox", sandbox_id=sid)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer cave_live_nope_nope"}, {"Authorization": "Basic abc"}],
    ids=["no-key", "unknown-key", "not-bearer"],
)
def test_no_valid_key_is_401(api_server: ApiServer, headers: dict[str, str]) -> None:
    accept = {"Accept": "application/json, text/event-stream"}
    response = httpx.post(
        f"{api_server.url}/mcp", json=INITIALIZE, headers={**accept, **headers}, timeout=60.0
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_namespace_key_cannot_touch_another_namespace(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    owner_key = namespace_key("mcp-owner", READ_WRITE)
    other_key = namespace_key("mcp-other", READ_WRITE)
    async with mcp_session(api_server, owner_key) as owner:
        sid = (await call(owner, "create_sandbox", name="private"))["id"]
        await call(owner, "write_file", sandbox_id=sid, path="secret.txt", content="mine")
        async with mcp_session(api_server, other_key) as other:
            for tool, arguments in [
                ("run_command", {"command": "cat secret.txt"}),
                ("read_file", {"path": "secret.txt"}),
                ("write_file", {"path": "secret.txt", "content": "theirs"}),
                ("list_files", {}),
                ("stop_sandbox", {}),
            ]:
                error = await refused(other, tool, sandbox_id=sid, **arguments)
                assert error["code"] == "sandbox_not_found", tool
            page = await call(other, "list_sandboxes")
            assert sid not in [item["id"] for item in page["items"]]
        still = await call(owner, "read_file", sandbox_id=sid, path="secret.txt")
        assert still["content"] == "mine"
        await call(owner, "stop_sandbox", sandbox_id=sid)


async def test_read_only_key_cannot_create(
    api_server: ApiServer, namespace_key: Callable[[str, list[str]], str]
) -> None:
    async with mcp_session(api_server, namespace_key("mcp-ro", ["sandboxes:read"])) as session:
        error = await refused(session, "create_sandbox", name="nope")
    assert error["code"] == "forbidden"


async def test_a_full_pool_is_a_capacity_error_after_the_wait(api_server: ApiServer) -> None:
    async with mcp_session(api_server, api_server.admin_key) as session:
        # This session's node is in no pool: pool "nowhere" never has room.
        error = await refused(
            session, "create_sandbox", labels={"cave.pool": "nowhere"}, wait_s=0.3
        )
    assert error["code"] == "capacity"
    assert "within 0.3 s" in error["message"]
