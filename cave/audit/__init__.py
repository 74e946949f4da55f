"""The tamper-evident audit trail: events, the signed JSONL log, its check, and scrubbing."""

from cave.audit.event import SYSTEM_ACTOR, AuditEvent, Outcome
from cave.audit.scrub import ScrubFilter, scrub
from cave.audit.settings import AuditSettings, load_audit_settings
from cave.audit.verify import VerifyResult, verify
from cave.audit.writer import AuditLogWriter, open_audit_log

__all__ = [
    "SYSTEM_ACTOR",
    "AuditEvent",
    "AuditLogWriter",
    "AuditSettings",
    "Outcome",
    "ScrubFilter",
    "VerifyResult",
    "load_audit_settings",
    "open_audit_log",
    "scrub",
    "verify",
]
