"""Request size limits: the body limit every HTTP request meets before routing and authentication,
and the cap on the output a non-streamed exec returns inline."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cave.errors import PayloadTooLargeError
from cave.settings_env import load_section
from config.api import ApiLimits
from deployments.http.errors import error_response

# A file upload is raw bytes streamed to the sandbox; everything else is a parsed JSON body.
_FILE_UPLOAD = re.compile(r"^/api/v1/sandboxes/[^/]+/files/.+")
_CHAT = ("/v1/chat/completions", "/api/v1/llm/chat")
_MCP = "/mcp"
DRAIN_S = 1.0  # how long a refused body is read and dropped before the 413 and the close


class RequestLimits(ApiLimits, frozen=True):
    """The limits (config.api.ApiLimits, CAVE_API_*), and which one a request's body meets."""

    def body_limit(self, method: str, path: str) -> tuple[int, str]:
        """The limit of a request's body and what it applies to, by method and path alone."""
        if method == "PUT" and _FILE_UPLOAD.match(path):
            return self.file_bytes, "a file upload"
        if method == "POST" and path in _CHAT:
            return self.chat_bytes, "a chat request"
        if path == _MCP:
            return self.mcp_bytes, "an MCP message"
        return self.json_bytes, "a request body"


def load_request_limits(env: Mapping[str, str]) -> RequestLimits:
    """The limits from CAVE_API_* variables; ConfigError naming a malformed one."""
    return load_section(RequestLimits, env)


class BodyLimitMiddleware:
    """Pure ASGI: a body above its route's limit is answered 413 before anything parses it.

    A declared Content-Length over the limit is refused before the app runs; a body without one
    (chunked) is counted as it is read, and the app's answer is replaced by the 413 as soon as
    the count passes the limit. Either way nothing past the limit is kept or parsed, whoever is
    asking.

    Before the 413 goes out, the rest of the body is read and thrown away for up to DRAIN_S
    (a lingering close, as nginx does): a server that closes a connection with unread data sends
    a TCP reset, and the reset can destroy its own answer on the way (seen: the client got the
    413's headers and lost its body). A body that takes longer gets the 413 and the reset.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: RequestLimits,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_reject = on_reject or (lambda code: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = self.limits.body_limit(scope["method"], _path(scope))
        refusal = PayloadTooLargeError(f"{what} may be at most {limit} bytes")
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, refusal)
            return
        guard = _Guard(limit, refusal)
        try:
            await self.app(scope, guard.receive(receive), guard.send(send))
        except Exception:
            if not guard.over:  # the app's own failure; the error handlers already answered
                raise
        if guard.over and not guard.started:
            await self._refuse(scope, receive, send, refusal)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, error: PayloadTooLargeError
    ) -> None:
        self.on_reject(error.code)
        await _drain(receive, DRAIN_S)
        request_id = str(scope.get("state", {}).get("request_id", "-"))
        response = error_response(413, error.code, error.message, request_id)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


async def _drain(receive: Receive, seconds: float) -> None:
    """Read and drop what is left of a request body, for at most `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return


class _Guard:
    """Counts the body as the app reads it; past the limit, reading fails and the app's own
    answer (a 400 from the parser, say) is dropped so that the 413 can take its place."""

    def __init__(self, limit: int, refusal: PayloadTooLargeError) -> None:
        self.limit, self.refusal = limit, refusal
        self.read = 0
        self.over = False
        self.started = False  # the app's response began before the body went over

    def receive(self, receive: Receive) -> Receive:
        async def counted() -> Message:
            if self.over:
                raise self.refusal
            message = await receive()
            if message["type"] == "http.request":
                self.read += len(message.get("body", b""))
                if self.read > self.limit:
                    self.over = True
                    raise self.refusal
            return message

        return counted

    def send(self, send: Send) -> Send:
        async def guarded(message: Message) -> None:
            if self.over and not self.started:
                return
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        return guarded


def _path(scope: Scope) -> str:
    """The path the routes see: under a mount (Serve's route prefix) without its root path."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None  # malformed: the server refuses it
    return None
