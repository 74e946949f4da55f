"""Namespace administration: which node pool a namespace's sandboxes go to (admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from cave.db import NamespaceRow
from deployments.deps import PrincipalDep, ServicesDep
from deployments.routes import ERROR_RESPONSES
from deployments.schemas import (
    NAMESPACE_PATTERN,
    NamespaceList,
    NamespaceOut,
    NamespaceSettings,
)

router = APIRouter(
    prefix="/api/v1/admin/namespaces", tags=["namespaces"], responses=ERROR_RESPONSES
)


@router.get("", response_model=NamespaceList)
async def list_namespaces(principal: PrincipalDep, services: ServicesDep) -> NamespaceList:
    rows = await services.sandboxes.namespaces(principal)
    return NamespaceList(items=[_out(row) for row in rows])


@router.put("/{namespace}", response_model=NamespaceOut)
async def update_namespace(
    namespace: Annotated[str, Path(pattern=NAMESPACE_PATTERN)],
    body: NamespaceSettings,
    principal: PrincipalDep,
    services: ServicesDep,
) -> NamespaceOut:
    """Assign the namespace (created if new) to a node pool: its sandboxes that ask for no pool
    go there, and it may use that pool even when it is restricted."""
    row = await services.sandboxes.set_namespace_pool(principal, namespace, body.pool)
    return _out(row)


def _out(row: NamespaceRow) -> NamespaceOut:
    return NamespaceOut(name=row.name, pool=row.pool, created_at=row.created_at)
