"""A sandbox's own API key: bound to it, shown once, revoked when it stops, renewed on start."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from cave.auth.keys import KeyInfo, KeyService
from cave.db import ApiKeyRow, SandboxRow
from cave.errors import NotFoundError

SANDBOX_SCOPES = ["sandboxes:read", "sandboxes:write"]


def add_sandbox_key(
    keys: KeyService, session: AsyncSession, sandbox: SandboxRow, not_after: datetime | None = None
) -> tuple[ApiKeyRow, str]:
    """A key bound to `sandbox`, added to the caller's transaction and named on the row;
    `not_after`: the creating key's expiry. Then `keys.record_created`."""
    key, plaintext = keys.add_key(
        session,
        "namespace",
        sandbox.namespace_id,
        SANDBOX_SCOPES,
        name=f"sandbox {sandbox.id}",
        sandbox_id=sandbox.id,
        not_after=not_after,
    )
    sandbox.api_key_id = key.id
    return key, plaintext


async def issue_sandbox_key(
    keys: KeyService, sandbox_id: str, namespace_id: str, actor: str = "system"
) -> tuple[KeyInfo, str]:
    """Create the key and name it on the sandbox's row in one transaction: both or neither.
    The plaintext is returned once, as when a sandbox is created."""
    async with keys.db.namespace_session(namespace_id) as session:
        sandbox = await session.get(SandboxRow, sandbox_id)
        if sandbox is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r} in namespace {namespace_id!r}")
        key, plaintext = add_sandbox_key(keys, session, sandbox)
    await keys.record_created(key, actor)
    return KeyInfo.of(key), plaintext


async def renew_sandbox_key(
    keys: KeyService,
    sandbox_id: str,
    namespace_id: str,
    actor: str = "system",
    not_after: datetime | None = None,
) -> str | None:
    """A new key for a sandbox started again, whose key its stop revoked: the plaintext, shown
    once like at creation. None while its key is still valid (never stopped)."""
    async with keys.db.namespace_session(namespace_id) as session:
        sandbox = await session.get(SandboxRow, sandbox_id)
        if sandbox is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r} in namespace {namespace_id!r}")
        current = await session.get(ApiKeyRow, sandbox.api_key_id) if sandbox.api_key_id else None
        if current is not None and current.revoked_at is None:
            return None
        key, plaintext = add_sandbox_key(keys, session, sandbox, not_after)
    await keys.record_created(key, actor)
    return plaintext
