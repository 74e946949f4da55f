"""Namespace administration (admin keys only): a namespace's node pool and quotas."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from deployments.http.deps import PrincipalDep, ServicesDep
from deployments.http.routes import ERROR_RESPONSES
from deployments.sandboxes.quotas import namespace_out
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
    defaults = services.settings.quotas
    return NamespaceList(items=[namespace_out(row, defaults) for row in rows])


@router.get("/{namespace}", response_model=NamespaceOut)
async def get_namespace(
    namespace: Annotated[str, Path(pattern=NAMESPACE_PATTERN)],
    principal: PrincipalDep,
    services: ServicesDep,
) -> NamespaceOut:
    """Its pool, its quotas in force, and what its live sandboxes hold now."""
    return await services.sandboxes.namespace(principal, namespace)


@router.put("/{namespace}", response_model=NamespaceOut)
async def update_namespace(
    namespace: Annotated[str, Path(pattern=NAMESPACE_PATTERN)],
    body: NamespaceSettings,
    principal: PrincipalDep,
    services: ServicesDep,
) -> NamespaceOut:
    """Change the namespace (created if new): `pool`, the node pool its sandboxes that ask for
    none go to (it may use that pool even when it is restricted); `quotas`, its overrides of the
    server's default quotas. A field left out of the body stays as it is."""
    return await services.sandboxes.update_namespace(principal, namespace, body)
