"""The one place where errors become HTTP: a status table walked along the class's MRO, and the
handlers that answer every failure with `{"error": {"code", "message", "request_id"}}`."""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cave import errors
from cave.auth.keys import ForbiddenError
from deployments.http.logs import current_request_id

log = logging.getLogger("cave.api")

STATUS_BY_ERROR: dict[type[errors.CaveError], int] = {
    errors.PayloadTooLargeError: 413,
    errors.InvalidArgumentError: 400,
    errors.ConfigError: 500,
    ForbiddenError: 403,
    errors.NamespaceMismatchError: 403,
    errors.TokenRevokedError: 403,  # a valid key whose access was withdrawn: forbidden now
    errors.AuthError: 401,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.QuotaExceededError: 429,
    errors.SandboxTimeoutError: 504,
    errors.IsolationUnavailableError: 503,
    errors.DatabaseUnavailableError: 503,
    errors.RevocationsStaleError: 503,  # with Retry-After: the refresh loop retries
    errors.ServiceUnavailableError: 503,
    errors.InferenceUnavailableError: 503,
    errors.SandboxError: 500,
    errors.AuditLogError: 500,
}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def status_of(error: errors.CaveError) -> int:
    for cls in type(error).__mro__:
        status = STATUS_BY_ERROR.get(cls)  # type: ignore[call-overload]
        if status is not None:
            return status
    return 500


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, on_error: Callable[[str], None] | None = None) -> None:
    """Every failure becomes the JSON error shape; `on_error(code)` counts them."""
    count = on_error or (lambda code: None)

    async def cave_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.CaveError)
        status = status_of(exc)
        count(exc.code)
        if status >= 500:
            log.error("request %s failed: %s", request_id_of(request), exc, exc_info=exc)
        return error_response(
            status,
            exc.code,
            exc.message,
            request_id_of(request),
            _details_of(exc),
            _headers_of(exc, status),
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        count("validation_error")
        details = [_field_error(e) for e in exc.errors()]
        message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details[:5])
        return error_response(422, "validation_error", message, request_id_of(request), details)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        count(code)
        return error_response(
            exc.status_code, code, str(exc.detail), request_id_of(request), None, exc.headers
        )

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        count("internal")
        log.exception("request %s failed", request_id_of(request), exc_info=exc)
        return error_response(
            500, "internal", "internal error; quote the request id", request_id_of(request)
        )

    app.add_exception_handler(errors.CaveError, cave_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _headers_of(error: errors.CaveError, status: int) -> dict[str, str] | None:
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(error, errors.QuotaExceededError | errors.RevocationsStaleError):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}  # RFC 9110: seconds
    return None


def _details_of(error: errors.CaveError) -> list[dict[str, Any]] | None:
    """The quota a refusal hit, its limit and what is in use (a client can show or back off)."""
    if isinstance(error, errors.QuotaExceededError) and error.quota:
        return [{"quota": error.quota, "limit": error.limit, "used": error.used}]
    return None


def _field_error(error: Any) -> dict[str, Any]:
    loc = ".".join(str(part) for part in error.get("loc", ()))
    return {"loc": loc, "msg": error.get("msg", ""), "type": error.get("type", "")}


class RequestIdMiddleware:
    """Gives every request an id (a sane client-sent X-Request-Id is kept), puts it in
    `scope["state"]` for handlers and logs, and echoes it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Behind Ray Serve the proxy gives each request an X-Request-Id (the client's or a new
        # one), passes it to us in the request and echoes it on the response itself: echoing it
        # here too would send the header twice.
        self._echo = not _behind_serve_proxy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        current_request_id.set(request_id)  # for log lines (deployments/http/logs.py)
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and self._echo:
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _behind_serve_proxy() -> bool:
    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SANE_ID.match(text) else None
    return None
