"""ModelAccess: request -> review -> signed model-access key -> revoke, with records and audit.

A namespace asks for a model, and may ask for its own requests/tokens per minute; an admin
approves (granting what was asked, or limits of the admin's own; the key is returned once, never
stored) or denies. A key's limits are signed into it; without any, the deployment's defaults
(CAVE_LLM_RPM/TPM) are. Only an admin grants "no limit" (0). An admin may revoke an issued key,
which every gateway replica honours within a second (inference/revocation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from cave.audit.trail import AuditTrail
from cave.auth.keys import ForbiddenError, Principal
from cave.db import Database, ModelAccessRequestRow, ModelAccessTokenRow, new_id, utcnow
from cave.errors import ConflictError, InvalidArgumentError, NotFoundError
from inference.tokens import TokenSigner, token_row

DEFAULT_SCOPES = ("llm:chat",)
KNOWN_SCOPES = frozenset(DEFAULT_SCOPES)


@dataclass(frozen=True)
class IssuedKey:
    token: str
    token_id: str
    expires_at: datetime
    rpm: int
    tpm: int


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; None: not given (the next default applies)."""

    rpm: int | None = None
    tpm: int | None = None


class ModelAccess:
    def __init__(
        self,
        db: Database,
        audit: AuditTrail,
        signer: TokenSigner,
        max_ttl_s: float,
        default_ttl_s: float,
    ) -> None:
        self.db = db
        self.audit = audit
        self.signer = signer
        self.max_ttl_s = max_ttl_s
        self.default_ttl_s = default_ttl_s

    async def request(
        self,
        principal: Principal,
        model_id: str,
        namespace: str,
        scopes: list[str] | None,
        ttl_s: float | None,
        reason: str,
        limits: Limits = Limits(),
    ) -> ModelAccessRequestRow:
        """A pending request; `limits` are what the namespace asks for (>= 1: "no limit" is
        the admin's to grant at approval)."""
        principal.require("llm:request")
        if not principal.is_admin and namespace != principal.namespace_id:
            raise ForbiddenError(f"this key acts in namespace {principal.namespace_id!r} only")
        wanted = sorted(set(scopes or DEFAULT_SCOPES))
        unknown = sorted(set(wanted) - KNOWN_SCOPES)
        if unknown:
            raise InvalidArgumentError(f"unknown scopes {unknown}; known: {sorted(KNOWN_SCOPES)}")
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= self.max_ttl_s:
            raise InvalidArgumentError(f"ttl_s must be in (0, {self.max_ttl_s:.0f}], got {ttl}")
        for name, value in (("rpm", limits.rpm), ("tpm", limits.tpm)):
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1; only an admin grants no limit")
        row = ModelAccessRequestRow(
            id=new_id(),
            namespace_id=namespace,
            model_id=model_id,
            scopes=wanted,
            ttl_s=int(ttl),
            rpm=limits.rpm,
            tpm=limits.tpm,
            reason=reason,
            state="pending",
            requested_by=principal.key_id,
        )
        async with self.db.namespace_session(namespace) as session:
            session.add(row)
        await self._audit(principal, "llm.request", row.id, namespace, {"model_id": model_id})
        return row

    async def list_requests(
        self, principal: Principal, state: str | None = None
    ) -> list[ModelAccessRequestRow]:
        _require_admin(principal)
        query = select(ModelAccessRequestRow).order_by(ModelAccessRequestRow.created_at.desc())
        if state:
            query = query.where(ModelAccessRequestRow.state == state)
        async with self.db.read_session(None) as session:
            return list((await session.scalars(query.limit(500))).all())

    async def approve(
        self, principal: Principal, request_id: str, limits: Limits = Limits()
    ) -> tuple[ModelAccessRequestRow, IssuedKey]:
        """Sign the key and record its id in the same transaction as the decision. Its limits:
        the admin's `limits`, else those the request asked for, else the defaults."""
        _require_admin(principal)
        async with self.db.admin_session() as session:
            row = await self._decide(session, request_id, "approved", principal)
            token, claims = self.signer.issue(
                sub=row.requested_by,
                model_id=row.model_id,
                cave_ns=row.namespace_id,
                scopes=list(row.scopes),
                ttl_s=row.ttl_s,
                rpm=row.rpm if limits.rpm is None else limits.rpm,
                tpm=row.tpm if limits.tpm is None else limits.tpm,
            )
            row.rpm, row.tpm = claims.rpm, claims.tpm  # what was granted
            session.add(token_row(claims, row.id))
        details: dict[str, object] = {
            "model_id": row.model_id,
            "token_id": claims.jti,
            "rpm": claims.rpm,
            "tpm": claims.tpm,
        }
        await self._audit(principal, "llm.approve", row.id, row.namespace_id, details)
        rpm, tpm = claims.rpm or 0, claims.tpm or 0  # the signer always sets both
        return row, IssuedKey(token, claims.jti, claims.expires_at, rpm, tpm)

    async def deny(self, principal: Principal, request_id: str) -> ModelAccessRequestRow:
        _require_admin(principal)
        async with self.db.admin_session() as session:
            row = await self._decide(session, request_id, "denied", principal)
        await self._audit(principal, "llm.deny", row.id, row.namespace_id, {})
        return row

    async def revoke(self, principal: Principal, model_id: str, token_id: str) -> None:
        _require_admin(principal)
        async with self.db.admin_session() as session:
            row = await session.get(ModelAccessTokenRow, token_id)
            if row is None or row.model_id != model_id:
                raise NotFoundError(f"no model-access key {token_id!r} for model {model_id!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
        await self._audit(
            principal, "llm.revoke", token_id, row.namespace_id, {"model_id": model_id}
        )

    async def _decide(
        self, session: object, request_id: str, state: str, principal: Principal
    ) -> ModelAccessRequestRow:
        result = await session.execute(  # type: ignore[attr-defined]
            update(ModelAccessRequestRow)
            .where(ModelAccessRequestRow.id == request_id, ModelAccessRequestRow.state == "pending")
            .values(state=state, decided_by=principal.key_id, decided_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        row = await session.get(ModelAccessRequestRow, request_id)  # type: ignore[attr-defined]
        if row is None:
            raise NotFoundError(f"no model-access request {request_id!r}")
        if result.rowcount != 1:
            raise ConflictError(f"request {request_id} is already {row.state}")
        return row  # type: ignore[no-any-return]

    async def _audit(
        self,
        principal: Principal,
        action: str,
        target: str,
        namespace: str | None,
        details: dict[str, object],
    ) -> None:
        await self.audit.record(principal.audit_event(action, target, namespace, details))


def _require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ForbiddenError("only an admin key may review model access")
