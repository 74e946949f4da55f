"""What isolation each sandbox really got (backend, guarantees, degraded), from its actor.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # NULL: never started (or started before this revision): nothing to report yet.
    op.add_column("sandboxes", sa.Column("isolation", _JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("isolation")
