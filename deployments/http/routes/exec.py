"""Exec routes: one JSON result, an NDJSON or SSE stream, or a WebSocket with live stdin."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from cave.auth.keys import Principal
from cave.errors import AuthError, CaveError, InvalidArgumentError
from deployments.http.deps import ManagerDep, PrincipalDep, get_services
from deployments.http.errors import status_of
from deployments.http.routes import ERROR_RESPONSES
from deployments.sandboxes.manager import SandboxManager
from deployments.schemas import ErrorBody, ExecEvent, ExecOut, ExecRequest

router = APIRouter(prefix="/api/v1/sandboxes", tags=["exec"], responses=ERROR_RESPONSES)
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# Inline, since FastAPI lists in components only the models routes name; what ExecEvent refers
# to (ExecOut, ErrorBody) is there already, so its `$defs` go and its refs point at components.
_EXEC_EVENT_SCHEMA = {
    k: v
    for k, v in ExecEvent.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    ).items()
    if k != "$defs"
}
_STREAM_DOC = {
    "description": "The result, or a stream of ExecEvents when asked for by `Accept`.",
    "content": {
        NDJSON: {"schema": _EXEC_EVENT_SCHEMA},
        SSE: {"schema": {"type": "string"}},
    },
}


@router.post("/{sandbox_id}/exec", response_model=ExecOut, responses={200: _STREAM_DOC})
async def exec_command(
    sandbox_id: str,
    body: ExecRequest,
    request: Request,
    principal: PrincipalDep,
    manager: ManagerDep,
) -> ExecOut | StreamingResponse:
    accept = request.headers.get("accept", "")
    if NDJSON in accept or SSE in accept:
        media = NDJSON if NDJSON in accept else SSE
        # Resolve first, so that a missing sandbox is a plain 404, not a stream with an error.
        await manager.ensure_running(principal, sandbox_id)
        events = manager.exec_stream(principal, sandbox_id, body)
        request_id = str(request.scope.get("state", {}).get("request_id", "-"))
        return StreamingResponse(_encoded(events, media, request_id), media_type=media)
    return await manager.run(principal, sandbox_id, body)


async def _encoded(
    events: AsyncIterator[ExecEvent], media: str, request_id: str
) -> AsyncIterator[bytes]:
    async for event in _with_error_event(events, request_id):
        text = event.model_dump_json(exclude_none=True)
        if media == NDJSON:
            yield f"{text}\n".encode()
        else:
            yield f"event: {event.type}\ndata: {text}\n\n".encode()


async def _with_error_event(
    events: AsyncIterator[ExecEvent], request_id: str
) -> AsyncIterator[ExecEvent]:
    """A failure after the response started ends the stream with an error event."""
    try:
        async for event in events:
            yield event
    except CaveError as exc:
        yield ExecEvent(
            type="error", error=ErrorBody(code=exc.code, message=exc.message, request_id=request_id)
        )


@router.websocket("/{sandbox_id}/exec/ws")
async def exec_websocket(websocket: WebSocket, sandbox_id: str) -> None:
    await websocket.accept()
    request_id = str(websocket.scope.get("state", {}).get("request_id", "-"))
    manager = get_services(websocket).sandboxes  # type: ignore[arg-type]
    try:
        principal = await _ws_principal(websocket)
        body = ExecRequest.model_validate_json(await websocket.receive_text())
        await _serve_exec(websocket, manager, principal, sandbox_id, body, request_id)
    except WebSocketDisconnect:
        return
    except (CaveError, ValidationError) as exc:
        error = exc if isinstance(exc, CaveError) else InvalidArgumentError(str(exc))
        event = ExecEvent(
            type="error",
            error=ErrorBody(code=error.code, message=error.message, request_id=request_id),
        )
        with contextlib.suppress(Exception):
            await websocket.send_text(event.model_dump_json(exclude_none=True))
            await websocket.close(code=1008 if status_of(error) in (401, 403) else 1011)


async def _ws_principal(websocket: WebSocket) -> Principal:
    header = websocket.headers.get("authorization")
    token = websocket.query_params.get("access_token")
    if not header and token:
        header = f"Bearer {token}"
    if not header:
        raise AuthError("missing API key: send Authorization: Bearer <key>")
    return await get_services(websocket).authenticate(header)  # type: ignore[arg-type]


async def _serve_exec(
    websocket: WebSocket,
    manager: SandboxManager,
    principal: Principal,
    sandbox_id: str,
    body: ExecRequest,
    request_id: str,
) -> None:
    events = manager.exec_stream(principal, sandbox_id, body, interactive=True)
    pump: asyncio.Task[None] | None = None
    try:
        async for event in events:
            if event.type == "started" and event.execution_id is not None:
                pump = asyncio.create_task(
                    _pump_stdin(websocket, manager, principal, sandbox_id, event.execution_id)
                )
                continue
            await websocket.send_text(event.model_dump_json(exclude_none=True))
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
    await websocket.close(code=1000)


async def _pump_stdin(
    websocket: WebSocket,
    manager: SandboxManager,
    principal: Principal,
    sandbox_id: str,
    exec_id: str,
) -> None:
    """Client messages to the exec's stdin until it closes stdin or the socket."""
    while True:
        message = json.loads(await websocket.receive_text())
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "stdin":
            data = str(message.get("data", "")).encode()
            await manager.write_stdin(principal, sandbox_id, exec_id, data)
        elif kind == "stdin_close":
            await manager.write_stdin(principal, sandbox_id, exec_id, None)
            return
