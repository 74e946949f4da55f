"""The MCP endpoint: a stateless Streamable HTTP app of the sandbox tools, behind the bearer keys.

The SDK's own auth speaks OAuth; CAVE's keys are plain bearer tokens, so a small ASGI wrapper
authenticates each request and hands the Principal to the tools in a context variable (the SDK
runs a request's tool calls in tasks started from that request, so they inherit it; the SDK's
own `get_access_token` relies on the same thing).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from cave.auth.keys import Principal
from cave.errors import AuthError
from deployments.http.mcp_tools import SandboxService, register_tools

Authenticate = Callable[[str], Awaitable[Principal]]

INSTRUCTIONS = (
    "CAVE runs code in isolated Linux sandboxes. Call create_sandbox, then run_command, "
    "write_file, read_file and list_files with the sandbox's id; call stop_sandbox when done. "
    "Paths are relative to the sandbox's workspace, which persists between commands until the "
    "sandbox stops."
)

MAX_BODY_BYTES = 4 * 1024 * 1024  # the SDK's default; CAVE_API_MAX_MCP_BODY_BYTES changes it
_principal: ContextVar[Principal | None] = ContextVar("cave_mcp_principal", default=None)


def build_mcp_app(
    manager: SandboxService, authenticate: Authenticate, max_body_bytes: int = MAX_BODY_BYTES
) -> tuple[ASGIApp, Callable[[], AbstractAsyncContextManager[None]]]:
    """The MCP ASGI app and the lifespan that must run around it.

    Serve the app at the endpoint path itself (a Starlette `Route`, which answers that path with
    no trailing-slash redirect) or under a `Mount`: it ignores the path. A parent app does not run
    a mounted app's lifespan, so the parent enters `lifespan()` in its own. Stateless with JSON
    responses: every request stands alone, so any replica can serve any request. Bodies over
    `max_body_bytes` are refused (413); the API's BodyLimitMiddleware applies the same limit
    first, with the JSON error body, and before the key is checked.
    """
    server = MCPServer("cave", instructions=INSTRUCTIONS, log_level="WARNING")
    register_tools(server, manager, current_principal)
    server.streamable_http_app(
        stateless_http=True,
        json_response=True,
        max_request_body_size=max_body_bytes,
        # DNS rebinding protection guards servers that trust the browser's network position;
        # every request here must carry a bearer key, which a rebound page does not have.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    session_manager = server.session_manager
    app = BearerAuth(NoStandaloneStream(session_manager.handle_request), authenticate)
    return app, session_manager.run


def current_principal() -> Principal:
    """Who the MCP request being served acts for."""
    principal = _principal.get()
    if principal is None:  # a tool called outside BearerAuth: refuse rather than guess
        raise AuthError("no authenticated key for this MCP request")
    return principal


class BearerAuth:
    """Pure ASGI: a 401 JSON error without a valid bearer key, else the app with the Principal set.

    A class, not a function, so that Starlette's `Route` treats it as an ASGI app.
    """

    def __init__(self, app: ASGIApp, authenticate: Authenticate) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        try:
            principal = await self.authenticate(header)
        except AuthError as exc:  # other errors (database down) are the parent app's to map
            await _unauthorized(scope, send, exc)
            return
        token = _principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            _principal.reset(token)


class NoStandaloneStream:
    """Answers GET with 405, as the spec lets a server without a server-to-client stream do.

    The stateless SDK would hold a GET open forever with nothing ever to send on it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            await _send_json(send, 405, _NO_STREAM, [(b"allow", b"POST")])
            return
        await self.app(scope, receive, send)


_NO_STREAM = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {"code": -32600, "message": "Method Not Allowed: this server offers no SSE stream"},
}


async def _unauthorized(scope: Scope, send: Send, exc: AuthError) -> None:
    request_id = _request_id(scope)
    body = {"error": {"code": exc.code, "message": exc.message, "request_id": request_id}}
    await _send_json(send, 401, body, [(b"www-authenticate", b'Bearer realm="cave"')])


async def _send_json(
    send: Send, status: int, body: object, headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _request_id(scope: Scope) -> str:
    state = scope.get("state") or {}
    request_id = state.get("request_id") if isinstance(state, dict) else None
    return str(request_id or uuid.uuid4().hex)
