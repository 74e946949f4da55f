"""Services: what one API replica holds (database, keys, audit trail, sandbox manager), built
from one environment mapping at start-up and closed at shutdown."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cave.audit.scrub import ScrubFilter
from cave.audit.trail import AuditTrail
from cave.audit.writer import AuditLogWriter, open_audit_log
from cave.auth.bearer import bearer_token
from cave.auth.keys import KeyService, Principal
from cave.auth.settings import AuthSettings
from cave.db import Database
from config.settings import Settings
from config.tree import CaveSettings, load_cave_settings
from deployments.llm.services import LlmServices
from deployments.sandboxes.exec_records import ExecRecorder
from deployments.sandboxes.manager import SandboxManager
from deployments.sandboxes.upkeep import flush_activity

log = logging.getLogger("cave.api")


@dataclass
class Services:
    settings: Settings
    auth: AuthSettings
    db: Database
    keys: KeyService
    audit: AuditTrail
    sandboxes: SandboxManager
    llm: LlmServices
    config: CaveSettings  # the whole tree, read once at the replica's start
    log_writer: AuditLogWriter | None = None

    @classmethod
    async def start(
        cls,
        env: Mapping[str, str] | None = None,
        replica: str = "",
        engines: Mapping[str, Any] | None = None,
    ) -> Services:
        """Every setting is checked before anything connects; a bad one is a ConfigError.
        `engines` maps model ids to the Serve handles of their engines."""
        config = load_cave_settings({**os.environ, **(env or {})})
        settings, auth, llm_settings = config.sandbox, config.auth, config.llm
        audit_settings = config.audit
        if audit_settings.enabled and replica:
            # One writer per log file: each replica signs its own chain (`<log>.<replica>.jsonl`).
            path = Path(audit_settings.path)
            audit_settings = audit_settings.model_copy(
                update={"path": path.with_name(f"{path.stem}.{replica}{path.suffix}")}
            )
        if audit_settings.scrub:
            _install_scrubbing()
        db = await Database.connect(config.database)
        writer = open_audit_log(audit_settings)
        audit = AuditTrail(db, writer, audit_settings.scrub)
        keys = KeyService(db, auth, audit)
        recorder = ExecRecorder(audit, config.exec_records.mode)
        manager = SandboxManager(settings, db, keys, audit, recorder)
        llm = await LlmServices.start(llm_settings, db, auth, audit, recorder, engines or {})
        return cls(settings, auth, db, keys, audit, manager, llm, config, writer)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <key>` header value."""
        return await self.keys.authenticate(bearer_token(authorization, "API key"))

    async def close(self) -> None:
        await self.llm.close()
        await self.sandboxes.recorder.close()
        try:
            await self.keys.flush_last_used()
            await flush_activity(self.sandboxes)
        except Exception:  # the database may be what went away; closing goes on
            log.exception("final flush failed")
        if self.log_writer is not None:
            self.log_writer.close()
        await self.db.close()


def _install_scrubbing() -> None:
    """BKG_SCRUB_LOGS: mask personal data in every log line this process writes."""
    for logger in (logging.getLogger(), logging.getLogger("cave")):
        for handler in logger.handlers:
            handler.addFilter(ScrubFilter())
