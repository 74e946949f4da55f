"""Per-namespace quota overrides: sandbox count, memory and CPU of live sandboxes, concurrent execs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Null: the server's default quota (settings [quotas]).
_COLUMNS = (
    ("quota_sandboxes", sa.Integer()),
    ("quota_memory_mb", sa.BigInteger()),
    ("quota_cpu", sa.Float()),
    ("quota_concurrent_execs", sa.Integer()),
)


def upgrade() -> None:
    for name, kind in _COLUMNS:
        op.add_column("namespaces", sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("namespaces") as batch:  # SQLite drops columns by copying the table
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
