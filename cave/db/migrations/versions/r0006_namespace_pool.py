"""A namespace may be assigned a node pool by an admin: its sandboxes are placed there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("namespaces", sa.Column("pool", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("namespaces") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("pool")
