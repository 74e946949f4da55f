"""A sandbox's own API key: bound to it, sealed at rest, revoked when it stops, renewed on start."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from cave.auth.keys import KeyInfo, KeyService
from cave.auth.sealing import seal, unseal
from cave.db import ApiKeyRow, SandboxRow
from cave.errors import NotFoundError

SANDBOX_SCOPES = ["sandboxes:read", "sandboxes:write"]


def add_sandbox_key(
    keys: KeyService, session: AsyncSession, sandbox: SandboxRow, not_after: datetime | None = None
) -> tuple[ApiKeyRow, str]:
    """A key bound to `sandbox`, added to the caller's transaction and sealed onto the row;
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
    sandbox.sealed_api_key = seal(keys.settings.secret_key, plaintext, context=sandbox.id)
    return key, plaintext


async def issue_sandbox_key(
    keys: KeyService, sandbox_id: str, namespace_id: str, actor: str = "system"
) -> KeyInfo:
    """Create the key and seal it onto the sandbox's row in one transaction: both or neither."""
    async with keys.db.namespace_session(namespace_id) as session:
        sandbox = await session.get(SandboxRow, sandbox_id)
        if sandbox is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r} in namespace {namespace_id!r}")
        key, _ = add_sandbox_key(keys, session, sandbox)
    await keys.record_created(key, actor)
    return KeyInfo.of(key)


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


async def reveal_sandbox_key(keys: KeyService, sandbox_id: str, namespace_id: str) -> str:
    """The plaintext, for code inside the sandbox's namespace (e.g. to hand to the sandbox)."""
    async with keys.db.namespace_session(namespace_id) as session:
        row = await session.get(SandboxRow, sandbox_id)
    if row is None or row.sealed_api_key is None:
        raise NotFoundError(f"sandbox {sandbox_id!r} has no key in namespace {namespace_id!r}")
    return unseal(keys.settings.secret_key, row.sealed_api_key, context=sandbox_id)
