"""Models added through the admin API: one row per model id with its spec; the admin's alone (RLS).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ADMIN = "current_setting('cave.admin', true) = 'on'"
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_registered_models")),
        sa.Column("spec", _JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.Text(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Like signing_keys: no namespace owns a row, and only an admin transaction may read or
        # change the registry (a namespace key must never deploy a model).
        op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON registered_models TO cave_app")
        op.execute("ALTER TABLE registered_models ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE registered_models FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY registered_models_admin ON registered_models USING ({ADMIN})")


def downgrade() -> None:
    op.drop_table("registered_models")  # drops its policy and grants with it
