"""Sandbox keys: shown once, kept nowhere, usable, seen only by their namespace, masked in lists."""

from __future__ import annotations

import pytest

from cave.auth.keys import ForbiddenError, KeyService
from cave.auth.sandbox_keys import issue_sandbox_key, renew_sandbox_key
from cave.auth.settings import AuthSettings
from cave.db import Database, NamespaceRow, SandboxRow
from cave.errors import AuthError, NotFoundError
from tests.db.conftest import Target

pytestmark = pytest.mark.anyio


async def test_a_sandbox_key_is_kept_nowhere_and_works(
    db: Database, auth_settings: AuthSettings, target: Target
) -> None:
    async with db.admin_session() as session:
        session.add_all([NamespaceRow(id="ns-a", name="a"), NamespaceRow(id="ns-b", name="b")])
        await session.flush()
        session.add(SandboxRow(id="sb-1", namespace_id="ns-a", name="one", state="running"))
    keys = KeyService(db, auth_settings)
    info, plaintext = await issue_sandbox_key(keys, "sb-1", "ns-a")
    principal = await keys.authenticate(plaintext)
    assert principal.key_id == info.id and principal.namespace_id == "ns-a"
    [row] = await target.raw("SELECT * FROM sandboxes WHERE id = 'sb-1'")
    assert info.id in row and not any(plaintext in str(value) for value in row)
    assert all(plaintext not in repr(k) for k in await keys.list("ns-a"))
    with pytest.raises(NotFoundError):  # another namespace does not see the sandbox at all
        await issue_sandbox_key(keys, "sb-1", "ns-b")
    assert await keys.list("ns-b") == []  # the refused issue left no key behind


async def test_a_sandbox_key_acts_on_its_sandbox_only_and_ends_with_it(
    db: Database, auth_settings: AuthSettings
) -> None:
    async with db.admin_session() as session:
        session.add(NamespaceRow(id="ns-a", name="a"))
        await session.flush()
        session.add_all(
            SandboxRow(id=sid, namespace_id="ns-a", name=sid, state="running")
            for sid in ("sb-1", "sb-2")
        )
    keys = KeyService(db, auth_settings)
    info, plaintext = await issue_sandbox_key(keys, "sb-1", "ns-a")
    assert info.sandbox_id == "sb-1"
    bound = await keys.authenticate(plaintext)
    assert bound.sandbox_id == "sb-1"
    bound.require("sandboxes:write", "sb-1")
    bound.require("sandboxes:read", "sb-1")
    for scope, sandbox in [
        ("sandboxes:write", "sb-2"),
        ("sandboxes:read", None),
        ("keys:read", None),
    ]:
        with pytest.raises(ForbiddenError, match="acts on it only"):
            bound.require(scope, sandbox)
    # Its successor is bound alike: a rotation never widens a sandbox key to the namespace.
    successor, successor_plain = await keys.rotate(info.id, "ns-a")
    assert (await keys.authenticate(successor_plain)).sandbox_id == "sb-1"
    assert await renew_sandbox_key(keys, "sb-1", "ns-a") is None  # still valid: kept
    assert set(await keys.revoke_sandbox_keys("sb-1")) == {info.id, successor.id}
    with pytest.raises(AuthError):
        await keys.authenticate(successor_plain)
    renewed = await renew_sandbox_key(keys, "sb-1", "ns-a")
    assert renewed is not None and renewed != successor_plain
    assert (await keys.authenticate(renewed)).sandbox_id == "sb-1"
