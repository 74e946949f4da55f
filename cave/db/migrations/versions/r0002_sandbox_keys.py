"""Sandboxes keep their own API key: its id and its sealed plaintext.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sandboxes", sa.Column("api_key_id", sa.String(64), nullable=True))
    op.add_column("sandboxes", sa.Column("sealed_api_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("sealed_api_key")
        batch.drop_column("api_key_id")
