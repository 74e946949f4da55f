"""Alembic environment: runs on the connection that cave.db.migrate hands over, never from a URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from cave.db.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "CAVE migrations run through cave.db (Database.connect or cave.db.migrate), "
        "which passes a connection in config.attributes['connection']"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: later revisions rewrite tables in batch mode.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
