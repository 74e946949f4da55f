"""A sandbox's own API key: issued with it, sealed at rest, revealed only to its namespace."""

from __future__ import annotations

from cave.auth.keys import KeyInfo, KeyService
from cave.auth.sealing import seal, unseal
from cave.db import SandboxRow
from cave.errors import NotFoundError

SANDBOX_SCOPES = ["sandboxes:read", "sandboxes:write"]


async def issue_sandbox_key(
    keys: KeyService, sandbox_id: str, namespace_id: str, actor: str = "system"
) -> KeyInfo:
    """Create the key and seal it onto the sandbox's row in one transaction: both or neither."""
    async with keys.db.namespace_session(namespace_id) as session:
        sandbox = await session.get(SandboxRow, sandbox_id)
        if sandbox is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r} in namespace {namespace_id!r}")
        key, plaintext = keys.add_key(
            session, "namespace", namespace_id, SANDBOX_SCOPES, name=f"sandbox {sandbox_id}"
        )
        sandbox.api_key_id = key.id
        sandbox.sealed_api_key = seal(keys.settings.secret_key, plaintext, context=sandbox_id)
    await keys.record_created(key, actor)
    return KeyInfo.of(key)


async def reveal_sandbox_key(keys: KeyService, sandbox_id: str, namespace_id: str) -> str:
    """The plaintext, for code inside the sandbox's namespace (e.g. to hand to the sandbox)."""
    async with keys.db.namespace_session(namespace_id) as session:
        row = await session.get(SandboxRow, sandbox_id)
    if row is None or row.sealed_api_key is None:
        raise NotFoundError(f"sandbox {sandbox_id!r} has no key in namespace {namespace_id!r}")
    return unseal(keys.settings.secret_key, row.sealed_api_key, context=sandbox_id)
