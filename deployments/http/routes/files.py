"""File routes: raw bytes in and out of a sandbox's /workspace."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from cave.errors import PayloadTooLargeError
from deployments.http.deps import ManagerDep, PrincipalDep
from deployments.http.routes import ERROR_RESPONSES
from deployments.sandboxes.ops import MAX_FILE_BYTES
from deployments.schemas import FileList, FileWritten

router = APIRouter(prefix="/api/v1/sandboxes", tags=["files"], responses=ERROR_RESPONSES)
_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("/{sandbox_id}/files", response_model=FileList)
async def list_files(
    sandbox_id: str,
    principal: PrincipalDep,
    manager: ManagerDep,
    path: Annotated[str, Query(max_length=4096)] = "",
) -> FileList:
    return await manager.list_files(principal, sandbox_id, path)


@router.put("/{sandbox_id}/files/{path:path}", response_model=FileWritten, openapi_extra=_RAW_BODY)
async def write_file(
    sandbox_id: str, path: str, request: Request, principal: PrincipalDep, manager: ManagerDep
) -> FileWritten:
    return await manager.write_file(principal, sandbox_id, path, await _body(request))


@router.get(
    "/{sandbox_id}/files/{path:path}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The bytes"}},
)
async def read_file(
    sandbox_id: str, path: str, principal: PrincipalDep, manager: ManagerDep
) -> Response:
    data = await manager.read_file(principal, sandbox_id, path)
    return Response(data, media_type="application/octet-stream")


@router.delete("/{sandbox_id}/files/{path:path}", status_code=204, response_class=Response)
async def delete_file(
    sandbox_id: str,
    path: str,
    principal: PrincipalDep,
    manager: ManagerDep,
    recursive: bool = False,
) -> Response:
    await manager.delete_file(principal, sandbox_id, path, recursive)
    return Response(status_code=204)


async def _body(request: Request) -> bytes:
    """The body, refused as soon as it passes the limit rather than after it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FILE_BYTES:
        raise PayloadTooLargeError(f"a file may be at most {MAX_FILE_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise PayloadTooLargeError(f"a file may be at most {MAX_FILE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
