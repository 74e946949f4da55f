"""Who a request acts for (a Principal), and the error of a key that may not do what it asks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cave.audit.event import AuditEvent, Outcome
from cave.errors import AuthError


class ForbiddenError(AuthError):
    """Authenticated, but the key lacks the scope (the API answers 403)."""

    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    key_id: str
    kind: str
    namespace_id: str | None
    scopes: frozenset[str]
    sandbox_id: str | None = None  # a sandbox's own key: it acts on that sandbox only
    expires_at: datetime | None = None  # what it hands out expires no later

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def audit_event(
        self,
        action: str,
        target: str,
        namespace: str | None = None,
        details: Mapping[str, Any] | None = None,
        outcome: Outcome = "ok",
    ) -> AuditEvent:
        """This key's action as an audit event: the one place a request's event is made."""
        return AuditEvent(self.key_id, action, target, outcome, namespace, details or {})

    def require(self, scope: str, sandbox_id: str | None = None) -> None:
        """ForbiddenError unless the key holds `scope`. A key bound to a sandbox passes only
        for a call on that sandbox (`sandbox_id`): a check that names no sandbox refuses it."""
        if self.sandbox_id is not None and sandbox_id != self.sandbox_id:
            raise ForbiddenError(
                f"key {self.key_id} is the key of sandbox {self.sandbox_id} and acts on it only"
            )
        if not self.is_admin and scope not in self.scopes:
            raise ForbiddenError(f"key {self.key_id} lacks the scope {scope!r}")

    def may_act_on(self, key_id: str, scopes: Iterable[str]) -> None:
        """ForbiddenError unless this key may revoke or rotate the key `key_id`: itself, or
        one whose every scope it holds (admins may act on any key)."""
        if self.is_admin or key_id == self.key_id:
            return
        missing = sorted(set(scopes) - self.scopes)
        if missing:
            raise ForbiddenError(
                f"key {self.key_id} may not act on key {key_id}: it lacks the scopes {missing}"
            )
