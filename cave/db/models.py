"""ORM rows of every CAVE table (SQLAlchemy 2 typed declarative); the schema itself is migrated."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cave.db.types import JsonType, UtcDateTime, new_id, utcnow

# Stable constraint names, so that later migrations can refer to them on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = String(64)
_PENDING = text("delivered_at IS NULL")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UtcDateTime(),
        dict[str, Any]: JsonType,
        dict[str, str]: JsonType,
        list[str]: JsonType,
    }


class NamespaceOwned:
    """Marks rows whose `namespace_id` says which namespace may see them (RLS, ORM filter)."""


class NamespaceRow(Base):
    __tablename__ = "namespaces"

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The node pool (Ray node label `cave.pool`) its sandboxes go to; None: the default pool.
    pool: Mapped[str | None] = mapped_column(Text, default=None)
    # An admin's quota overrides (deployments/sandboxes/quotas.py); None: the server's default.
    quota_sandboxes: Mapped[int | None] = mapped_column(default=None)
    quota_memory_mb: Mapped[int | None] = mapped_column(BigInteger, default=None)
    quota_cpu: Mapped[float | None] = mapped_column(Float, default=None)
    quota_concurrent_execs: Mapped[int | None] = mapped_column(default=None)


class SandboxRow(NamespaceOwned, Base):
    __tablename__ = "sandboxes"
    __table_args__ = (
        # Target of the (sandbox_id, namespace_id) foreign key of executions.
        UniqueConstraint("id", "namespace_id"),
        Index(None, "namespace_id", "created_at"),
        Index(None, "state"),
        Index(None, "node_id"),
        Index(None, "state", "expires_at"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    namespace_id: Mapped[str] = mapped_column(Id, ForeignKey("namespaces.id"))
    name: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32))
    node_id: Mapped[str | None] = mapped_column(Text)
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, str]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    stopped_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # started_at + ttl; the reaper stops it then
    ttl_s: Mapped[float | None] = mapped_column(Float)
    idle_timeout_s: Mapped[float | None] = mapped_column(Float)
    last_active_at: Mapped[datetime | None]  # written in batches, not per exec
    failure: Mapped[str | None] = mapped_column(Text)
    # The sandbox's own API key (its plaintext is shown once, when made, and kept nowhere).
    # No foreign key: keys are revoked, never deleted.
    api_key_id: Mapped[str | None] = mapped_column(Id)
    # What the actor that ran it reported: backend, guarantees, degraded (None: never started).
    isolation: Mapped[dict[str, Any] | None]


class ExecutionRow(NamespaceOwned, Base):
    __tablename__ = "executions"
    __table_args__ = (
        # An execution always belongs to its sandbox's namespace.
        ForeignKeyConstraint(
            ["sandbox_id", "namespace_id"], ["sandboxes.id", "sandboxes.namespace_id"]
        ),
        Index(None, "sandbox_id", "started_at"),
        Index(None, "namespace_id", "started_at"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    sandbox_id: Mapped[str] = mapped_column(Id)
    namespace_id: Mapped[str] = mapped_column(Id)
    command: Mapped[list[str]]
    exit_code: Mapped[int | None]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int | None]
    timed_out: Mapped[bool] = mapped_column(default=False)
    oom_killed: Mapped[bool] = mapped_column(default=False)
    truncated: Mapped[bool] = mapped_column(default=False)
    stdout_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    stderr_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    output_sha256: Mapped[str | None] = mapped_column(String(64))


class ApiKeyRow(NamespaceOwned, Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "(kind = 'admin' AND namespace_id IS NULL)"
            " OR (kind = 'namespace' AND namespace_id IS NOT NULL)",
            name="kind_matches_namespace",
        ),
        Index(None, "namespace_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    namespace_id: Mapped[str | None] = mapped_column(Id, ForeignKey("namespaces.id"))
    kind: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(default=list)
    name: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    rotated_from_id: Mapped[str | None] = mapped_column(Id, ForeignKey("api_keys.id"))
    grace_until: Mapped[datetime | None]
    # A sandbox's own key acts on that sandbox only; revoked when it stops. No foreign key,
    # like SandboxRow.api_key_id: sandboxes are marked deleted, never removed.
    sandbox_id: Mapped[str | None] = mapped_column(Id, index=True)


class KeyRotationEventRow(NamespaceOwned, Base):
    __tablename__ = "key_rotation_events"
    __table_args__ = (Index(None, "namespace_id", "created_at"),)

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    key_id: Mapped[str] = mapped_column(Id, ForeignKey("api_keys.id"), index=True)
    new_key_id: Mapped[str] = mapped_column(Id, ForeignKey("api_keys.id"))
    namespace_id: Mapped[str | None] = mapped_column(Id, ForeignKey("namespaces.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    grace_until: Mapped[datetime]


class OutboxRow(Base):
    """An event to deliver (webhook); any session may enqueue, only an admin session reads."""

    __tablename__ = "outbox"
    __table_args__ = (
        # The dispatcher's query: undelivered events whose next attempt is due.
        Index(
            "ix_outbox_pending",
            "next_attempt_at",
            postgresql_where=_PENDING,
            sqlite_where=_PENDING,
        ),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(Id, unique=True, default=new_id)
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class AuditEventRow(NamespaceOwned, Base):
    """One audited action; append-only for the application role (no UPDATE, no DELETE)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "namespace_id", "ts"), Index(None, "ts"))

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    # No foreign key: the audit trail outlives what it talks about.
    namespace_id: Mapped[str | None] = mapped_column(Id)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ts: Mapped[datetime] = mapped_column(default=utcnow)


class ModelAccessRequestRow(NamespaceOwned, Base):
    __tablename__ = "model_access_requests"
    __table_args__ = (
        UniqueConstraint("id", "namespace_id"),
        Index(None, "namespace_id", "state"),
        Index(None, "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    namespace_id: Mapped[str] = mapped_column(Id, ForeignKey("namespaces.id"))
    model_id: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(default=list)
    ttl_s: Mapped[int]
    # Requests and tokens per minute asked for (NULL: the deployment's default), then granted.
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    reason: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    requested_by: Mapped[str] = mapped_column(Text)
    decided_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None]


class ModelAccessTokenRow(NamespaceOwned, Base):
    __tablename__ = "model_access_tokens"
    __table_args__ = (
        ForeignKeyConstraint(
            ["request_id", "namespace_id"],
            ["model_access_requests.id", "model_access_requests.namespace_id"],
        ),
        UniqueConstraint("id", "namespace_id"),
        Index(None, "namespace_id", "expires_at"),
        Index(None, "request_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)  # the token's jti
    request_id: Mapped[str] = mapped_column(Id)
    namespace_id: Mapped[str] = mapped_column(Id)
    model_id: Mapped[str] = mapped_column(Text)
    kid: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    # The limits signed into the token (0: none); NULL for tokens issued before revision 0010.
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]


class UsageEventRow(NamespaceOwned, Base):
    """Tokens used by one chat request; append-only for the application role."""

    __tablename__ = "usage_events"
    __table_args__ = (
        ForeignKeyConstraint(
            ["token_id", "namespace_id"],
            ["model_access_tokens.id", "model_access_tokens.namespace_id"],
        ),
        Index(None, "namespace_id", "created_at"),
        Index(None, "token_id"),
    )

    id: Mapped[str] = mapped_column(Id, primary_key=True, default=new_id)
    token_id: Mapped[str] = mapped_column(Id)
    namespace_id: Mapped[str] = mapped_column(Id)
    model_id: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    ttft_ms: Mapped[int | None]
    duration_ms: Mapped[int]
    served_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookIdRow(Base):
    """A webhook event id received: until `seen_until` the same id is a replay. Shared by every
    replica through the database; the admin's alone (RLS on PostgreSQL)."""

    __tablename__ = "webhook_ids"

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    seen_until: Mapped[datetime] = mapped_column(index=True)


class SigningKeyRow(Base):
    """An Ed25519 key that signs model-access tokens; the admin's alone (RLS on PostgreSQL)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(Id, primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16), default="EdDSA")
    public_key: Mapped[str] = mapped_column(Text)  # the raw 32 bytes in base64url: the JWK's "x"
    # The raw private key, sealed with CAVE_SECRET_KEY (AES-GCM) and bound to the kid.
    sealed_private_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None]  # signs no more
    expires_at: Mapped[datetime | None]  # verifies no more: every token it signed has expired


class RegisteredModelRow(Base):
    """A model added through the admin API (the models file's models are not stored here); the
    admin's alone (RLS on PostgreSQL). Every gateway replica polls the table."""

    __tablename__ = "registered_models"

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[dict[str, Any]]  # the ModelSpec's fields but model_id (inference/registry.py)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str] = mapped_column(Text)  # the admin key that wrote it last
