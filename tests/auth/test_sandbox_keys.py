"""Sandbox keys: sealed in the database, usable, seen only by their namespace, masked in lists."""

from __future__ import annotations

import pytest

from cave.auth.keys import KeyService
from cave.auth.sandbox_keys import issue_sandbox_key, reveal_sandbox_key
from cave.auth.settings import AuthSettings
from cave.db import Database, NamespaceRow, SandboxRow
from cave.errors import NotFoundError
from tests.db.conftest import Target

pytestmark = pytest.mark.anyio


async def test_a_sandbox_key_is_sealed_at_rest_and_works(
    db: Database, auth_settings: AuthSettings, target: Target
) -> None:
    async with db.admin_session() as session:
        session.add_all([NamespaceRow(id="ns-a", name="a"), NamespaceRow(id="ns-b", name="b")])
        await session.flush()
        session.add(SandboxRow(id="sb-1", namespace_id="ns-a", name="one", state="running"))
    keys = KeyService(db, auth_settings)
    info = await issue_sandbox_key(keys, "sb-1", "ns-a")
    plaintext = await reveal_sandbox_key(keys, "sb-1", "ns-a")
    principal = await keys.authenticate(plaintext)
    assert principal.key_id == info.id and principal.namespace_id == "ns-a"
    [(stored, key_id)] = await target.raw(
        "SELECT sealed_api_key, api_key_id FROM sandboxes WHERE id = 'sb-1'"
    )
    assert key_id == info.id and stored.startswith("v1:") and plaintext not in stored
    assert all(plaintext not in repr(k) for k in await keys.list("ns-a"))
    with pytest.raises(NotFoundError):  # another namespace does not see the sandbox at all
        await reveal_sandbox_key(keys, "sb-1", "ns-b")
    with pytest.raises(NotFoundError):
        await issue_sandbox_key(keys, "sb-1", "ns-b")
    assert await keys.list("ns-b") == []  # the refused issue left no key behind
