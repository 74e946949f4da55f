"""FastAPI dependencies: the replica's services and the request's authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cave.auth.keys import Principal
from deployments.http.services import Services
from deployments.sandboxes.manager import SandboxManager

# auto_error=False: a missing key is our 401 JSON error, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="A CAVE API key: cave_live_<id>_<secret>")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_manager(request: Request) -> SandboxManager:
    return get_services(request).sandboxes


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = request.headers.get("authorization")
    return await get_services(request).authenticate(header)


ServicesDep = Annotated[Services, Depends(get_services)]
ManagerDep = Annotated[SandboxManager, Depends(get_manager)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
