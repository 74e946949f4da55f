"""Model access: request, review, revoke, the JWKS, and the OpenAI-compatible chat endpoints."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from cave.auth.keys import ForbiddenError
from cave.db import ModelAccessRequestRow, new_id
from cave.errors import CaveError, ConfigError
from deployments.http.deps import PrincipalDep, ServicesDep
from deployments.http.errors import request_id_of
from deployments.http.routes import ERROR_RESPONSES
from deployments.llm.engine import model_app_name
from deployments.llm.schemas import (
    AccessRequestIn,
    AccessRequestList,
    AccessRequestOut,
    ApprovedOut,
    ApproveIn,
    ModelList,
    ModelOut,
    ModelRegistryOut,
    ModelSpecIn,
    ModelSpecOut,
    RegisteredModel,
    RevokeIn,
    chunk,
    completion,
    usage_chunk,
)
from inference.access import Limits
from inference.gateway import ChatStream
from inference.openai_chat import ChatCompletionIn
from inference.registry import MODEL_ID_PATTERN, ModelSpec

router = APIRouter(tags=["model access"], responses=ERROR_RESPONSES)
NamespaceHeader = Annotated[str | None, Header(alias="X-Cave-Namespace", max_length=63)]
ModelIdPath = Annotated[
    str, Path(pattern=f"^{MODEL_ID_PATTERN}$", description="May hold `/` (Hugging Face style)")
]


@router.post("/api/v1/llm/requests", status_code=201, response_model=AccessRequestOut)
async def request_access(
    body: AccessRequestIn, principal: PrincipalDep, services: ServicesDep
) -> AccessRequestOut:
    row = await services.llm.access.request(
        principal,
        body.model_id,
        body.cave_namespace,
        list(body.scopes) if body.scopes is not None else None,
        body.ttl_s,
        body.reason,
        Limits(body.rpm, body.tpm),
    )
    return _request_out(row)


@router.get("/api/v1/admin/llm/requests", response_model=AccessRequestList)
async def list_requests(
    principal: PrincipalDep,
    services: ServicesDep,
    state: Annotated[str | None, "pending | approved | denied"] = None,
) -> AccessRequestList:
    rows = await services.llm.access.list_requests(principal, state)
    return AccessRequestList(items=[_request_out(r) for r in rows])


@router.post("/api/v1/admin/llm/requests/{request_id}/approve", response_model=ApprovedOut)
async def approve(
    request_id: str,
    principal: PrincipalDep,
    services: ServicesDep,
    body: ApproveIn | None = None,
) -> ApprovedOut:
    """Issue the key. Its limits: the body's, else the request's, else the defaults."""
    limits = Limits(body.rpm, body.tpm) if body is not None else Limits()
    decided, issued = await services.llm.access.approve(principal, request_id, limits)
    return ApprovedOut(
        **_request_out(decided).model_dump(),
        model_access_key=issued.token,
        token_id=issued.token_id,
        expires_at=issued.expires_at,
    )


@router.post("/api/v1/admin/llm/requests/{request_id}/deny", response_model=AccessRequestOut)
async def deny(request_id: str, principal: PrincipalDep, services: ServicesDep) -> AccessRequestOut:
    return _request_out(await services.llm.access.deny(principal, request_id))


@router.post(
    "/api/v1/admin/llm/models/{model_id}/revoke_key", status_code=204, response_class=Response
)
async def revoke_key(
    model_id: str, body: RevokeIn, principal: PrincipalDep, services: ServicesDep
) -> Response:
    await services.llm.access.revoke(principal, model_id, body.token_id)
    services.llm.revocations.revoke_local(body.token_id)  # this replica at once, others < 1 s
    return Response(status_code=204)


@router.get("/api/v1/admin/llm/models", response_model=ModelRegistryOut)
async def registry(principal: PrincipalDep, services: ServicesDep) -> ModelRegistryOut:
    """The model registry: every model this gateway can serve, and where (the models file and
    the admin API for local engines, CAVE_PEERS_FILE for peers)."""
    if not principal.is_admin:
        raise ForbiddenError("only an admin key may read the model registry")
    listed = await services.llm.models.listing()
    return ModelRegistryOut(models=[RegisteredModel.model_validate(m) for m in listed])


@router.put(
    "/api/v1/admin/llm/models/{model_id:path}",
    response_model=ModelSpecOut,
    responses={201: {"model": ModelSpecOut, "description": "Registered (200: replaced)"}},
)
async def put_model(
    model_id: ModelIdPath,
    body: ModelSpecIn,
    principal: PrincipalDep,
    services: ServicesDep,
    response: Response,
) -> ModelSpecOut:
    """Register a model, or replace one added here, and deploy it as its own Serve app; its
    replicas start in the background (see the registry's `status`)."""
    with _spec_errors():
        spec, created = await services.llm.models.put(principal, model_id, body.model_dump())
    response.status_code = 201 if created else 200
    return _spec_out(spec)


@router.delete("/api/v1/admin/llm/models/{model_id:path}", status_code=204, response_class=Response)
async def delete_model(
    model_id: ModelIdPath, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Remove a model added through the API and delete its Serve app."""
    await services.llm.models.delete(principal, model_id)
    return Response(status_code=204)


@contextlib.contextmanager
def _spec_errors() -> Iterator[None]:
    """A spec the registry refuses is a 422 naming the field, like a schema error."""
    try:
        yield
    except ConfigError as exc:
        field = getattr(exc, "field", None)
        loc = ("path", "model_id") if field == "model_id" else ("body", *([field] if field else []))
        reason = getattr(exc, "reason", exc.message)
        raise RequestValidationError([{"loc": loc, "msg": reason, "type": "value_error"}]) from None


def _spec_out(spec: ModelSpec) -> ModelSpecOut:
    return ModelSpecOut(**spec.to_dict(), app=model_app_name(spec.model_id))


@router.get("/.well-known/jwks.json")
async def jwks(services: ServicesDep) -> dict[str, Any]:
    keys: dict[str, Any] = await services.llm.jwks()
    return keys


@router.get("/v1/models", response_model=ModelList)
async def models(services: ServicesDep) -> ModelList:
    return ModelList(data=[ModelOut(id=m) for m in services.llm.chat.models()])


@router.post("/v1/chat/completions")
@router.post("/api/v1/llm/chat")
async def chat(
    body: ChatCompletionIn,
    request: Request,
    services: ServicesDep,
    namespace: NamespaceHeader = None,
) -> Response:
    # Every refusal (401, 403, 404, 429, 503) comes from `open`, before the stream starts.
    authorization = request.headers.get("authorization")
    stream = await services.llm.chat.open(authorization, namespace, body)
    completion_id, created = f"chatcmpl-{new_id()}", int(time.time())
    if body.stream:
        sse = _sse(stream, body, completion_id, created, request_id_of(request))
        return StreamingResponse(sse, media_type="text/event-stream")
    async with stream:
        text = "".join([str(d.get("text", "")) async for d in stream])
    return JSONResponse(completion(completion_id, created, body.model, text, stream.usage))


async def _sse(
    stream: ChatStream,
    body: ChatCompletionIn,
    completion_id: str,
    created: int,
    request_id: str,
) -> AsyncIterator[bytes]:
    first = {"role": "assistant", "content": ""}
    yield _event(chunk(completion_id, created, body.model, first, None))
    async with stream:  # the usage is recorded before [DONE]
        try:
            async for delta in stream:
                finish = delta.get("finish_reason")
                content = {"content": str(delta.get("text", ""))} if delta.get("text") else {}
                yield _event(chunk(completion_id, created, body.model, content, finish))
            include = body.stream_options is None or body.stream_options.include_usage
            if include:
                yield _event(usage_chunk(completion_id, created, body.model, stream.usage))
        except CaveError as exc:  # mid-stream: an error event ends the stream
            error = {"code": exc.code, "message": exc.message, "request_id": request_id}
            yield _event({"error": error})
    yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _request_out(row: ModelAccessRequestRow) -> AccessRequestOut:
    return AccessRequestOut(
        id=row.id,
        model_id=row.model_id,
        cave_namespace=row.namespace_id,
        scopes=list(row.scopes),
        ttl_s=row.ttl_s,
        rpm=row.rpm,
        tpm=row.tpm,
        reason=row.reason,
        state=row.state,  # type: ignore[arg-type]
        requested_by=row.requested_by,
        decided_by=row.decided_by,
        created_at=row.created_at,
        decided_at=row.decided_at,
    )
