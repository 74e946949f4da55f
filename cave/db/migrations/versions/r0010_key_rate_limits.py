"""Each model-access key's own requests and tokens per minute, asked for and granted.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TABLES = ("model_access_requests", "model_access_tokens")


def upgrade() -> None:
    # NULL: asked for nothing (a request) or issued before this revision (a token): the
    # gateway's defaults apply, as the token itself carries no limits either.
    for table in _TABLES:
        op.add_column(table, sa.Column("rpm", sa.Integer(), nullable=True))
        op.add_column(table, sa.Column("tpm", sa.Integer(), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite drops columns by copying the table
            batch.drop_column("tpm")
            batch.drop_column("rpm")
