"""The first admin key of a deployment, made by `cave up` (or an operator) in the database."""

from __future__ import annotations

from collections.abc import Mapping

from cave.audit.trail import AuditTrail
from cave.auth.keys import KeyService
from cave.auth.settings import load_auth_settings
from cave.db import Database, load_database_settings

BOOTSTRAP_NAME = "bootstrap"


async def create_admin_key(env: Mapping[str, str], name: str = BOOTSTRAP_NAME) -> str:
    """A new admin key's plaintext: shown once, stored only as a hash. Migrates the database
    first, so that it works before the API has ever started."""
    auth = load_auth_settings(env)
    async with await Database.connect(load_database_settings(env)) as db:
        keys = KeyService(db, auth, AuditTrail(db))
        _, plaintext = await keys.create("admin", None, [], name=name)
    return plaintext
