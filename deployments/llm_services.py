"""What one API replica holds for model access: signing keys, verifier, revocations, engines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.rate_limiter import SharedRateLimiter
from cave.audit.trail import AuditTrail
from cave.auth.settings import AuthSettings
from cave.db import Database
from deployments.chat import ChatGateway
from deployments.exec_records import ExecRecorder
from inference.access import ModelAccess
from inference.llm_settings import LlmSettings
from inference.peers import PeerHealth, PeerRouter, load_peers
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import PeerKeys, TokenSigner, TokenVerifier

REVOCATION_REFRESH_S = 0.5  # revocations reach every replica within about this


@dataclass
class LlmServices:
    settings: LlmSettings
    keys: SigningKeys
    revocations: RevocationCache
    access: ModelAccess
    chat: ChatGateway
    peers: PeerRouter | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        settings: LlmSettings,
        db: Database,
        auth: AuthSettings,
        audit: AuditTrail,
        recorder: ExecRecorder,
        engines: Mapping[str, Any],
    ) -> LlmServices:
        keys = SigningKeys(db, auth.secret_key, settings)
        await keys.current()  # signer and verifier read keys from memory: load them first
        revocations = RevocationCache(db)
        await revocations.refresh()
        peers = _peers(settings)
        verifier = TokenVerifier(keys, revocations, settings, peers.trusted if peers else None)
        access = ModelAccess(
            db, audit, TokenSigner(keys, settings), settings.token_max_ttl_s, settings.token_ttl_s
        )
        limited = settings.rpm or settings.tpm  # no limiter actor at all without a limit
        limiter = SharedRateLimiter() if limited else None
        chat = ChatGateway(
            verifier,
            recorder,
            engines,
            "local",
            limiter,
            settings.rpm,
            settings.tpm,
            peers,
            settings.issuer,
        )
        services = cls(settings, keys, revocations, access, chat, peers)
        services._tasks.append(asyncio.create_task(revocations.run(REVOCATION_REFRESH_S)))
        if peers is not None:  # peers' keys and health: fetched in the background, at once
            services._tasks.append(asyncio.create_task(peers.run()))
        return services

    async def jwks(self) -> dict[str, Any]:
        return dict(await self.keys.jwks())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.peers is not None:
            await self.peers.close()


def _peers(settings: LlmSettings) -> PeerRouter | None:
    """The peer router of CAVE_PEERS_FILE (ConfigError when malformed); None without one."""
    if not settings.peers_file:
        return None
    found = load_peers(settings.peers_file, settings.issuer)
    health = PeerHealth(found.cooldown_s)
    return PeerRouter(found.peers, PeerKeys(), health, probe_interval_s=found.probe_interval_s)
