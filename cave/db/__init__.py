"""Persistence of CAVE: settings, the Database object and its sessions, rows, error translation."""

from cave.db.database import APP_ROLE, Database, admitted
from cave.db.errors import translate_error, translate_errors
from cave.db.migrate import head_revision
from cave.db.models import (
    ApiKeyRow,
    AuditEventRow,
    Base,
    ExecutionRow,
    KeyRotationEventRow,
    ModelAccessRequestRow,
    ModelAccessTokenRow,
    NamespaceOwned,
    NamespaceRow,
    OutboxRow,
    SandboxRow,
    SigningKeyRow,
    UsageEventRow,
    WebhookIdRow,
)
from cave.db.scoping import Scope, scope_of
from cave.db.settings import DatabaseSettings, load_database_settings
from cave.db.types import new_id, utcnow

__all__ = [
    "admitted",
    "APP_ROLE",
    "ApiKeyRow",
    "AuditEventRow",
    "Base",
    "Database",
    "DatabaseSettings",
    "ExecutionRow",
    "KeyRotationEventRow",
    "ModelAccessRequestRow",
    "ModelAccessTokenRow",
    "NamespaceOwned",
    "NamespaceRow",
    "OutboxRow",
    "SandboxRow",
    "Scope",
    "SigningKeyRow",
    "UsageEventRow",
    "WebhookIdRow",
    "head_revision",
    "load_database_settings",
    "new_id",
    "scope_of",
    "translate_error",
    "translate_errors",
    "utcnow",
]
