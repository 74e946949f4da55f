"""Sandboxes expire and say why they failed: start time, ttl deadline, idle timeout, last activity.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = ("started_at", "expires_at", "last_active_at")
_DURATIONS = ("ttl_s", "idle_timeout_s")


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("sandboxes", sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    for name in _DURATIONS:
        op.add_column("sandboxes", sa.Column(name, sa.Float(), nullable=True))
    op.add_column("sandboxes", sa.Column("failure", sa.Text(), nullable=True))
    # The reaper's query: running sandboxes past their deadline.
    op.create_index("ix_sandboxes_state_expires_at", "sandboxes", ["state", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_sandboxes_state_expires_at", table_name="sandboxes")
    with op.batch_alter_table("sandboxes") as batch:  # SQLite drops columns by copying the table
        for name in ("failure", *_DURATIONS, *_COLUMNS):
            batch.drop_column(name)
