"""Sandboxes no longer keep their key's plaintext: it was sealed at rest and never read.

The key is shown once, in the answer that makes it (like every key); a sealed copy in the
database only widened what a stolen database and CAVE_SECRET_KEY together give away.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("sealed_api_key")


def downgrade() -> None:
    # The plaintexts are gone: a downgraded sandbox has no sealed key, as if never given one.
    op.add_column("sandboxes", sa.Column("sealed_api_key", sa.Text(), nullable=True))
