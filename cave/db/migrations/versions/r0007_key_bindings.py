"""API keys bound to one sandbox; webhook event ids seen (a replay guard shared by replicas).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ADMIN = "current_setting('cave.admin', true) = 'on'"


def upgrade() -> None:
    # No foreign key, like sandboxes.api_key_id: sandboxes are marked deleted, never removed.
    op.add_column("api_keys", sa.Column("sandbox_id", sa.String(64), nullable=True))
    op.create_index(op.f("ix_api_keys_sandbox_id"), "api_keys", ["sandbox_id"])
    op.create_table(
        "webhook_ids",
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_webhook_ids")),
        sa.Column("seen_until", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(op.f("ix_webhook_ids_seen_until"), "webhook_ids", ["seen_until"])
    if op.get_bind().dialect.name == "postgresql":
        # Like the outbox: no namespace owns a row; only an admin transaction reads or writes.
        op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_ids TO cave_app")
        op.execute("ALTER TABLE webhook_ids ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE webhook_ids FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY webhook_ids_admin ON webhook_ids USING ({ADMIN})")


def downgrade() -> None:
    op.drop_table("webhook_ids")  # drops its index, policy and grants with it
    op.drop_index(op.f("ix_api_keys_sandbox_id"), table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("sandbox_id")
