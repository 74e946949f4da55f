"""Initial schema: every table, and on PostgreSQL the cave_app role with row-level security.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the model types: a migration must not change when the models do.
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_PENDING = sa.text("delivered_at IS NULL")

# table -> column that names the namespace allowed to see a row
NAMESPACED = {
    "namespaces": "id",
    "sandboxes": "namespace_id",
    "executions": "namespace_id",
    "api_keys": "namespace_id",
    "key_rotation_events": "namespace_id",
    "audit_events": "namespace_id",
    "model_access_requests": "namespace_id",
    "model_access_tokens": "namespace_id",
    "usage_events": "namespace_id",
}
# The application role may only append to these (an audit trail is not edited).
APPEND_ONLY = {"audit_events", "usage_events"}
ADMIN = "current_setting('cave.admin', true) = 'on'"


def _id(name: str = "id", *args: sa.ForeignKey, **kwargs: object) -> sa.Column[str]:
    return sa.Column(name, sa.String(64), *args, **kwargs)  # type: ignore[arg-type]


def _fk(table: str, column: str, target: str) -> sa.ForeignKey:
    return sa.ForeignKey(f"{target}.id", name=op.f(f"fk_{table}_{column}_{target}"))


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def _unique(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def _index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    _core_tables()
    _key_tables()
    _event_tables()
    _model_tables()
    if op.get_bind().dialect.name == "postgresql":
        _row_level_security()


def _core_tables() -> None:
    op.create_table(
        "namespaces",
        _id(nullable=False),
        _pk("namespaces"),
        sa.Column("name", sa.Text(), nullable=False),
        _unique("namespaces", "name"),
        _ts("created_at"),
    )
    op.create_table(
        "sandboxes",
        _id(nullable=False),
        _pk("sandboxes"),
        _id("namespace_id", _fk("sandboxes", "namespace_id", "namespaces"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("node_id", sa.Text()),
        sa.Column("limits", _JSON, nullable=False),
        sa.Column("labels", _JSON, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("stopped_at", nullable=True),
        _unique("sandboxes", "id", "namespace_id"),
    )
    _index("sandboxes", "namespace_id", "created_at")
    _index("sandboxes", "state")
    _index("sandboxes", "node_id")
    op.create_table(
        "executions",
        _id(nullable=False),
        _pk("executions"),
        _id("sandbox_id", nullable=False),
        _id("namespace_id", nullable=False),
        sa.Column("command", _JSON, nullable=False),
        sa.Column("exit_code", sa.Integer()),
        _ts("started_at"),
        sa.Column("duration_ms", sa.Integer()),
        sa.Column("timed_out", sa.Boolean(), nullable=False),
        sa.Column("oom_killed", sa.Boolean(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("stdout_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stderr_bytes", sa.BigInteger(), nullable=False),
        sa.Column("output_sha256", sa.String(64)),
        sa.ForeignKeyConstraint(
            ["sandbox_id", "namespace_id"],
            ["sandboxes.id", "sandboxes.namespace_id"],
            name=op.f("fk_executions_sandbox_id_sandboxes"),
        ),
    )
    _index("executions", "sandbox_id", "started_at")
    _index("executions", "namespace_id", "started_at")


def _key_tables() -> None:
    op.create_table(
        "api_keys",
        _id(nullable=False),
        _pk("api_keys"),
        _id("namespace_id", _fk("api_keys", "namespace_id", "namespaces")),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(64), nullable=False),
        _unique("api_keys", "prefix"),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("scopes", _JSON, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        _id("rotated_from_id", _fk("api_keys", "rotated_from_id", "api_keys")),
        _ts("grace_until", nullable=True),
        sa.CheckConstraint(
            "(kind = 'admin' AND namespace_id IS NULL)"
            " OR (kind = 'namespace' AND namespace_id IS NOT NULL)",
            name=op.f("ck_api_keys_kind_matches_namespace"),
        ),
    )
    _index("api_keys", "namespace_id")
    op.create_table(
        "key_rotation_events",
        _id(nullable=False),
        _pk("key_rotation_events"),
        _id("key_id", _fk("key_rotation_events", "key_id", "api_keys"), nullable=False),
        _id("new_key_id", _fk("key_rotation_events", "new_key_id", "api_keys"), nullable=False),
        _id("namespace_id", _fk("key_rotation_events", "namespace_id", "namespaces")),
        _ts("created_at"),
        _ts("grace_until"),
    )
    _index("key_rotation_events", "key_id")
    _index("key_rotation_events", "namespace_id", "created_at")


def _event_tables() -> None:
    op.create_table(
        "outbox",
        _id(nullable=False),
        _pk("outbox"),
        _id("event_id", nullable=False),
        _unique("outbox", "event_id"),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("payload", _JSON, nullable=False),
        _ts("created_at"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at"),
        _ts("delivered_at", nullable=True),
        sa.Column("last_error", sa.Text()),
    )
    op.create_index(
        op.f("ix_outbox_pending"),
        "outbox",
        ["next_attempt_at"],
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )
    op.create_table(
        "audit_events",
        _id(nullable=False),
        _pk("audit_events"),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        _unique("audit_events", "seq"),
        _id("namespace_id"),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text()),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("details", _JSON, nullable=False),
        _ts("ts"),
    )
    _index("audit_events", "namespace_id", "ts")
    _index("audit_events", "ts")


def _model_tables() -> None:
    op.create_table(
        "model_access_requests",
        _id(nullable=False),
        _pk("model_access_requests"),
        _id(
            "namespace_id",
            _fk("model_access_requests", "namespace_id", "namespaces"),
            nullable=False,
        ),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("scopes", _JSON, nullable=False),
        sa.Column("ttl_s", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=False),
        sa.Column("decided_by", sa.Text()),
        _ts("created_at"),
        _ts("decided_at", nullable=True),
        _unique("model_access_requests", "id", "namespace_id"),
    )
    _index("model_access_requests", "namespace_id", "state")
    _index("model_access_requests", "state", "created_at")
    op.create_table(
        "model_access_tokens",
        _id(nullable=False),
        _pk("model_access_tokens"),
        _id("request_id", nullable=False),
        _id("namespace_id", nullable=False),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        _ts("issued_at"),
        _ts("expires_at"),
        _ts("revoked_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id", "namespace_id"],
            ["model_access_requests.id", "model_access_requests.namespace_id"],
            name=op.f("fk_model_access_tokens_request_id_model_access_requests"),
        ),
        _unique("model_access_tokens", "id", "namespace_id"),
    )
    _index("model_access_tokens", "namespace_id", "expires_at")
    _index("model_access_tokens", "request_id")
    op.create_table(
        "usage_events",
        _id(nullable=False),
        _pk("usage_events"),
        _id("token_id", nullable=False),
        _id("namespace_id", nullable=False),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Integer()),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("served_by", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["token_id", "namespace_id"],
            ["model_access_tokens.id", "model_access_tokens.namespace_id"],
            name=op.f("fk_usage_events_token_id_model_access_tokens"),
        ),
    )
    _index("usage_events", "namespace_id", "created_at")
    _index("usage_events", "token_id")


def _row_level_security() -> None:
    # cave_app is cluster-wide: another database may create it at the same moment.
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cave_app') THEN
                BEGIN
                    CREATE ROLE cave_app NOLOGIN NOBYPASSRLS;
                EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                END;
            END IF;
            IF (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = 'cave_app') THEN
                RAISE EXCEPTION 'role cave_app must not bypass row-level security';
            END IF;
            IF NOT pg_has_role(current_user, 'cave_app', 'MEMBER') THEN
                EXECUTE format('GRANT cave_app TO %I', current_user);
            END IF;
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO cave_app', current_schema());
        END
        $$
        """
    )
    for table, column in NAMESPACED.items():
        rights = "SELECT, INSERT" if table in APPEND_ONLY else "SELECT, INSERT, UPDATE, DELETE"
        allowed = f"{ADMIN} OR {column} = current_setting('cave.namespace', true)"
        op.execute(f"GRANT {rights} ON {table} TO cave_app")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY {table}_namespace ON {table} USING ({allowed})")
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO cave_app")
    op.execute("ALTER TABLE outbox ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE outbox FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY outbox_admin ON outbox USING ({ADMIN})")
    op.execute("CREATE POLICY outbox_enqueue ON outbox FOR INSERT WITH CHECK (true)")


def downgrade() -> None:
    # Dropping a table drops its policies and grants; the role may serve other databases.
    for table in (
        "usage_events",
        "model_access_tokens",
        "model_access_requests",
        "audit_events",
        "outbox",
        "key_rotation_events",
        "api_keys",
        "executions",
        "sandboxes",
        "namespaces",
    ):
        op.drop_table(table)
