"""Sandbox lifecycle routes: create, list, get, start, stop, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from cave.errors import InvalidArgumentError
from deployments.http.deps import ManagerDep, PrincipalDep
from deployments.http.routes import ERROR_RESPONSES, created_links
from deployments.sandboxes.manager import MAX_PAGE
from deployments.schemas import (
    CreatedSandboxOut,
    CreateSandboxRequest,
    SandboxOut,
    SandboxPage,
    SandboxState,
)

router = APIRouter(prefix="/api/v1/sandboxes", tags=["sandboxes"], responses=ERROR_RESPONSES)
_USES_SANDBOX = [
    f"{verb}_api_v1_sandboxes__sandbox_id__{tail}"
    for verb, tail in (
        ("get_sandbox", "get"),
        ("exec_command", "exec_post"),
        ("list_files", "files_get"),
        ("write_file", "files__path__put"),
        ("read_file", "files__path__get"),
        ("delete_file", "files__path__delete"),
        ("stop_sandbox", "stop_post"),
        ("start_sandbox", "start_post"),
        ("delete_sandbox", "delete"),
    )
]


@router.post(
    "",
    status_code=201,
    response_model=CreatedSandboxOut,
    responses=created_links("sandbox_id", _USES_SANDBOX),
)
async def create_sandbox(
    body: CreateSandboxRequest, principal: PrincipalDep, manager: ManagerDep
) -> CreatedSandboxOut:
    return await manager.create(principal, body)


@router.get("", response_model=SandboxPage)
async def list_sandboxes(
    principal: PrincipalDep,
    manager: ManagerDep,
    state: SandboxState | None = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    label: Annotated[list[str] | None, Query(description="k=v; repeat to require several")] = None,
    namespace: Annotated[str | None, Query(max_length=63)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> SandboxPage:
    return await manager.list(
        principal,
        state=state,
        name=name,
        labels=_labels(label or []),
        namespace=namespace,
        limit=limit,
        cursor=cursor,
    )


@router.get("/{sandbox_id}", response_model=SandboxOut)
async def get_sandbox(sandbox_id: str, principal: PrincipalDep, manager: ManagerDep) -> SandboxOut:
    return await manager.get(principal, sandbox_id)


@router.delete("/{sandbox_id}", status_code=204, response_class=Response)
async def delete_sandbox(sandbox_id: str, principal: PrincipalDep, manager: ManagerDep) -> Response:
    await manager.delete(principal, sandbox_id)
    return Response(status_code=204)


@router.post("/{sandbox_id}/start", response_model=CreatedSandboxOut)
async def start_sandbox(
    sandbox_id: str, principal: PrincipalDep, manager: ManagerDep
) -> CreatedSandboxOut:
    """Start it; a sandbox started again after a stop gets a new key of its own, in `api_key`."""
    return await manager.start(principal, sandbox_id)


@router.post("/{sandbox_id}/stop", response_model=SandboxOut)
async def stop_sandbox(sandbox_id: str, principal: PrincipalDep, manager: ManagerDep) -> SandboxOut:
    return await manager.stop(principal, sandbox_id)


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"label filter {pair!r} is not k=v")
        labels[key] = value
    return labels
