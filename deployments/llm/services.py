"""What one API replica holds for model access: signing keys, verifier, revocations, engines,
and the models added through the admin API (`ModelAdmin`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.rate_limiter import SharedRateLimiter
from cave.audit.trail import AuditTrail
from cave.auth.keys import ForbiddenError, Principal
from cave.auth.settings import AuthSettings
from cave.db import Database
from cave.errors import ConflictError, InferenceUnavailableError, NotFoundError
from config.llm import LlmSettings
from deployments.llm.engine import (
    delete_model_app,
    deploy_model_app,
    model_app_name,
    model_app_statuses,
    model_handle,
)
from inference.access import ModelAccess
from inference.gateway import ChatGateway, UsageRecorder
from inference.peers import PeerHealth, PeerRouter, load_peers
from inference.registry import ModelSpec, RegisteredModels, check_deployable
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import PeerKeys, TokenSigner, TokenVerifier

log = logging.getLogger("cave.api")
REVOCATION_REFRESH_S = 0.5  # revocations reach every replica within about this
MODELS_REFRESH_S = 0.5  # models added or deleted on another replica reach this one within this
MISS_REFRESH_S = 0.25  # a request for a model not served here re-reads the table at most this often
Origin = Literal["config", "api", "peer"]


@dataclass
class LlmServices:
    settings: LlmSettings
    keys: SigningKeys
    revocations: RevocationCache
    access: ModelAccess
    chat: ChatGateway
    models: ModelAdmin
    peers: PeerRouter | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        settings: LlmSettings,
        db: Database,
        auth: AuthSettings,
        audit: AuditTrail,
        recorder: UsageRecorder,
        engines: Mapping[str, Any],
    ) -> LlmServices:
        keys = SigningKeys(db, auth.secret_key, settings)
        await keys.current()  # signer and verifier read keys from memory: load them first
        revocations = RevocationCache(
            db, leeway_s=settings.leeway_s, max_age_s=settings.revocation_max_age_s
        )
        await revocations.refresh()
        peers = _peers(settings)
        verifier = TokenVerifier(keys, revocations, settings, peers.trusted if peers else None)
        access = ModelAccess(
            db, audit, TokenSigner(keys, settings), settings.token_max_ttl_s, settings.token_ttl_s
        )
        # Always: a key may carry limits of its own even where the defaults are 0.
        limiter = SharedRateLimiter()
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
        models = ModelAdmin(db, audit, chat)
        chat.find_model = models.find  # a model added on another replica is found at once
        await models.refresh()  # the admin API's models are served from the first request
        services = cls(settings, keys, revocations, access, chat, models, peers)
        services._tasks.append(asyncio.create_task(revocations.run(REVOCATION_REFRESH_S)))
        services._tasks.append(asyncio.create_task(models.run(MODELS_REFRESH_S)))
        services._tasks.append(asyncio.create_task(_logged(models.redeploy_missing())))
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


class ModelAdmin:
    """The models added through the admin API, as this replica sees them: their rows (polled
    every MODELS_REFRESH_S, and on a miss), their Serve apps (deployed and deleted here), and
    the gateway's engines. The models file's models are read-only here (409)."""

    def __init__(self, db: Database, audit: AuditTrail, gateway: ChatGateway) -> None:
        self.store = RegisteredModels(db)
        self.audit = audit
        self.gateway = gateway
        self.specs: dict[str, ModelSpec] = {}
        self._handles: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._read_at = -math.inf  # time.monotonic() of the last read of the table
        self._writes = 0  # this replica's own writes: a read that overlaps one is stale

    async def put(
        self, principal: Principal, model_id: str, fields: Mapping[str, Any]
    ) -> tuple[ModelSpec, bool]:
        """Register or replace `model_id` and deploy its Serve app; returns the spec and whether
        it is new. A spec this cluster cannot serve is a ModelSpecError naming the field."""
        self._writable(principal, model_id)
        spec = ModelSpec.from_dict({**fields, "model_id": model_id})
        check_deployable(spec)
        previous = await self.store.put(spec, principal.key_id)
        try:
            await asyncio.to_thread(deploy_model_app, spec)
        except InferenceUnavailableError:
            await self.store.restore(model_id, previous, principal.key_id)
            raise
        self._apply({**self.specs, model_id: spec}, local=True)
        details = {"spec": spec.to_dict(), "replaced": previous is not None}
        await self._audit(principal, "llm.model.put", model_id, details)
        return spec, previous is None

    async def delete(self, principal: Principal, model_id: str) -> None:
        """Remove `model_id`: at once from this replica's gateway, from the others within
        MODELS_REFRESH_S, then its Serve app (waiting until it is gone)."""
        self._writable(principal, model_id)
        removed = await self.store.delete(model_id)
        if removed is None and not await self._app_exists(model_id):
            raise NotFoundError(f"no model {model_id!r} was added through the admin API")
        self._apply({m: s for m, s in self.specs.items() if m != model_id}, local=True)
        await asyncio.to_thread(delete_model_app, model_id)
        details = {"spec": removed}
        await self._audit(principal, "llm.model.delete", model_id, details)

    async def refresh(self) -> None:
        """Read the table and serve what it holds; concurrent callers share the lock."""
        async with self._lock:
            writes = self._writes
            specs = await self.store.all()
            self._read_at = time.monotonic()
            if writes == self._writes:  # else a write here overtook the read: keep the write
                self._apply(specs)

    async def find(self, model: str) -> None:
        """A request names a model not served here: another replica may have added it a moment
        ago, so read the table again (at most every MISS_REFRESH_S, callers share reads)."""
        if model not in self.gateway.engines and time.monotonic() - self._read_at > MISS_REFRESH_S:
            await self.refresh()

    async def run(self, interval_s: float = MODELS_REFRESH_S) -> None:
        """Refresh every `interval_s` until cancelled; a failed read is logged and retried."""
        while True:
            try:
                await self.refresh()
            except Exception:  # the database is away, most likely: the next tick retries
                log.exception("reading the registered models failed")
            await asyncio.sleep(interval_s)

    async def redeploy_missing(self) -> None:
        """Deploy every registered model whose Serve app is gone: after a restart of the Ray
        cluster the table outlives the apps (a replica's restart finds them running)."""
        if not self.specs:
            return
        running = await asyncio.to_thread(model_app_statuses)
        for spec in (await self.store.all()).values():  # read again: one may just be deleted
            if model_app_name(spec.model_id) not in running and spec.model_id in self.specs:
                log.info("deploying registered model %r: its Serve app is gone", spec.model_id)
                await asyncio.to_thread(deploy_model_app, spec)

    async def listing(self) -> list[dict[str, Any]]:
        """Every model and where it is served (see ChatGateway.registry), with its origin; the
        admin API's models with their Serve app's status."""
        served = await self.gateway.registry()
        statuses = await asyncio.to_thread(model_app_statuses) if self.specs else {}
        for model, spec in self.specs.items():
            status, message = statuses.get(model_app_name(model), ("NOT_STARTED", ""))
            place = {
                "kind": "local",
                "name": "local",
                "engine": spec.engine,
                "healthy": status == "RUNNING",
                "status": status,
                "message": message or None,
            }
            served[model] = [place, *served.get(model, [])]
        return [
            {"model_id": m, "origin": self._origin(m), "served_at": places}
            for m, places in sorted(served.items())
        ]

    def _origin(self, model: str) -> Origin:
        if self.gateway.is_static(model):
            return "config"
        return "api" if model in self.specs else "peer"

    def _writable(self, principal: Principal, model_id: str) -> None:
        if not principal.is_admin:
            raise ForbiddenError("only an admin key may change the model registry")
        if self.gateway.is_static(model_id):
            raise ConflictError(
                f"model {model_id!r} comes from the models file (CAVE_MODELS_FILE, or the "
                "app's `models` argument) and is read-only over the API: change the file "
                "and redeploy"
            )

    def _apply(self, specs: Mapping[str, ModelSpec], local: bool = False) -> None:
        if local:
            self._writes += 1
        self.specs = {m: s for m, s in specs.items() if not self.gateway.is_static(m)}
        self._handles = {m: self._handles.get(m) or model_handle(m) for m in self.specs}
        self.gateway.set_registered(self._handles)

    async def _app_exists(self, model_id: str) -> bool:
        return model_app_name(model_id) in await asyncio.to_thread(model_app_statuses)

    async def _audit(
        self, principal: Principal, action: str, model_id: str, details: dict[str, Any]
    ) -> None:
        await self.audit.record(principal.audit_event(action, model_id, details=details))


async def _logged(work: Awaitable[None]) -> None:
    """A background step that must not fail silently (a task's exception is never read)."""
    try:
        await work
    except Exception:
        log.exception("registered models: redeploying failed")
