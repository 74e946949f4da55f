"""API key routes: create, list (masked), revoke, rotate, and the signed rotation webhook."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from cave.audit.event import AuditEvent
from cave.auth import webhooks
from cave.auth.keys import ForbiddenError, KeyInfo, Principal
from cave.errors import InvalidArgumentError, NotFoundError
from deployments.http.deps import PrincipalDep, ServicesDep
from deployments.http.routes import ERROR_RESPONSES, created_links
from deployments.schemas import (
    CreatedKeyOut,
    CreateKeyRequest,
    KeyList,
    KeyOut,
    RotateKeyRequest,
    WebhookReceived,
)

router = APIRouter(prefix="/api/v1/auth/keys", tags=["keys"], responses=ERROR_RESPONSES)
MAX_WEBHOOK_BYTES = 64 * 1024


_USES_KEY = [
    "revoke_key_api_v1_auth_keys__key_id__delete",
    "rotate_key_api_v1_auth_keys__key_id__rotate_post",
]


@router.post(
    "", status_code=201, response_model=CreatedKeyOut, responses=created_links("key_id", _USES_KEY)
)
async def create_key(
    body: CreateKeyRequest, principal: PrincipalDep, services: ServicesDep
) -> CreatedKeyOut:
    principal.require("keys:write")
    namespace = _namespace_for_new_key(principal, body)
    if namespace is not None:
        await services.sandboxes.ensure_namespace(namespace)
    info, plaintext = await services.keys.create(
        body.kind,
        namespace,
        list(body.scopes),
        body.name,
        body.ttl_s,
        actor=principal.key_id,
        not_after=principal.expires_at,
    )
    return CreatedKeyOut(**_key_out(info).model_dump(), key=plaintext)


@router.get("", response_model=KeyList)
async def list_keys(
    principal: PrincipalDep,
    services: ServicesDep,
    namespace: Annotated[str | None, Query(max_length=63)] = None,
) -> KeyList:
    principal.require("keys:read")
    scope = namespace if principal.is_admin else principal.namespace_id
    keys = await services.keys.list(scope)
    return KeyList(items=[_key_out(k) for k in keys])


@router.delete("/{key_id}", status_code=204, response_class=Response)
async def revoke_key(key_id: str, principal: PrincipalDep, services: ServicesDep) -> Response:
    principal.require("keys:write")
    await services.keys.revoke(
        key_id, _own_namespace(principal), actor=principal.key_id, by=principal
    )
    return Response(status_code=204)


@router.post(
    "/{key_id}/rotate",
    status_code=201,
    response_model=CreatedKeyOut,
    responses=created_links("key_id", _USES_KEY),
)
async def rotate_key(
    key_id: str,
    principal: PrincipalDep,
    services: ServicesDep,
    body: RotateKeyRequest | None = None,
) -> CreatedKeyOut:
    principal.require("keys:write")
    grace = body.grace_s if body is not None else None
    info, plaintext = await services.keys.rotate(
        key_id, _own_namespace(principal), grace, actor=principal.key_id, by=principal
    )
    return CreatedKeyOut(**_key_out(info).model_dump(), key=plaintext)


@router.post("/rotated", response_model=WebhookReceived)
async def rotation_received(request: Request, services: ServicesDep) -> WebhookReceived:
    """Receiver of the signed `key.rotated` webhook (Standard Webhooks, see docs/auth.md): drops
    the rotated key from this replica's cache at once. A replayed event (its id seen by any
    replica) is answered 200 with `duplicate`. A server without a webhook secret has no
    receiver: 404."""
    secret = services.auth.webhook_secret
    if secret is None:
        raise NotFoundError("no webhook receiver here: CAVE_ROTATION_WEBHOOK_SECRET is not set")
    body = await request.body()
    if len(body) > MAX_WEBHOOK_BYTES:
        raise InvalidArgumentError(f"a webhook body may be at most {MAX_WEBHOOK_BYTES} bytes")
    verified = webhooks.verify(request.headers, body, secret)
    payload = _json_object(body)
    if not await webhooks.first_delivery(services.db, verified):
        return WebhookReceived(event_id=verified.event_id, topic="key.rotated", duplicate=True)
    services.keys.forget(str(payload.get("key_id", "")))
    await services.audit.record(
        AuditEvent(
            "webhook",
            "key.rotation_received",
            str(payload.get("key_id", "")),
            namespace=str(payload["namespace_id"]) if payload.get("namespace_id") else None,
            details={"event_id": verified.event_id},
        )
    )
    return WebhookReceived(event_id=verified.event_id, topic=str(payload.get("type", "")))


def _namespace_for_new_key(principal: Principal, body: CreateKeyRequest) -> str | None:
    if body.kind == "admin":
        if not principal.is_admin:
            raise ForbiddenError("only an admin key may create admin keys")
        if body.namespace is not None:
            raise InvalidArgumentError("an admin key has no namespace")
        return None
    if principal.is_admin:
        if body.namespace is None:
            raise InvalidArgumentError("a namespace key needs a namespace")
        return body.namespace
    if body.namespace not in (None, principal.namespace_id):
        raise ForbiddenError(f"this key acts in namespace {principal.namespace_id!r} only")
    missing = sorted(set(body.scopes) - principal.scopes)
    if missing:
        raise ForbiddenError(f"a key cannot grant scopes it does not hold: {missing}")
    return principal.namespace_id


def _own_namespace(principal: Principal) -> str | None:
    """None (every namespace) for admins; a namespace key reaches its own keys only (RLS)."""
    return None if principal.is_admin else principal.namespace_id


def _key_out(info: KeyInfo) -> KeyOut:
    return KeyOut(
        id=info.id,
        masked=info.masked,
        kind=info.kind,  # type: ignore[arg-type]
        namespace=info.namespace_id,
        scopes=list(info.scopes),
        name=info.name,
        created_at=info.created_at,
        expires_at=info.expires_at,
        revoked_at=info.revoked_at,
        grace_until=info.grace_until,
        last_used_at=info.last_used_at,
        rotated_from_id=info.rotated_from_id,
    )


def _json_object(body: bytes) -> dict[str, object]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise InvalidArgumentError("the webhook body is not JSON") from None
    if not isinstance(payload, dict):
        raise InvalidArgumentError("the webhook body is not a JSON object")
    return payload
