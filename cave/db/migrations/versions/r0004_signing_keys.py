"""Signing keys of model-access tokens: Ed25519, private half sealed; the admin's alone (RLS).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ADMIN = "current_setting('cave.admin', true) = 'on'"


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("sealed_private_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Like the outbox: no namespace owns a row, and only an admin transaction may read or
        # write one (a namespace session must never see even a sealed private key).
        op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON signing_keys TO cave_app")
        op.execute("ALTER TABLE signing_keys ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE signing_keys FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY signing_keys_admin ON signing_keys USING ({ADMIN})")


def downgrade() -> None:
    op.drop_table("signing_keys")  # drops its policy and grants with it
