"""`AuditEvent`: who did what to which object, with what outcome."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from cave.errors import InvalidArgumentError

Outcome = Literal["ok", "denied", "error"]
SYSTEM_ACTOR = "system"
_OUTCOMES = frozenset(get_args(Outcome))
_second = (-1, "")  # (a second, its RFC 3339 text): one strftime per second, not per event


_VERSION_4 = (0xF000 << 64 | 0xC000 << 48, 0x4000 << 64 | 0x8000 << 48)  # (clear, set) bits


def new_id() -> str:
    """A random UUID (version 4, RFC 4122 variant) as 32 hex digits."""
    # Not uuid4(): its os.urandom drops the GIL, a thread switch per event under load. An id must
    # be unique, not secret; `random` is seeded from urandom and reseeded in a forked child.
    clear, set_ = _VERSION_4
    return f"{random.getrandbits(128) & ~clear | set_:032x}"


def utc_timestamp() -> str:
    """Now as RFC 3339 in UTC with microseconds, e.g. 2026-11-27T09:15:02.123456Z."""
    global _second
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second  # one read: another thread may replace it meanwhile
    if second != cached[0]:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micros:06d}Z"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited action; `details` must be JSON-able (checked when it is written)."""

    actor: str  # an API key id, or "system"
    action: str  # e.g. "sandbox.create", "key.rotate"
    target: str  # e.g. a sandbox id or a key id
    outcome: Outcome = "ok"
    namespace: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    ts: str = field(default_factory=utc_timestamp)

    def __post_init__(self) -> None:
        if self.outcome not in _OUTCOMES:
            raise InvalidArgumentError(
                f"audit outcome {self.outcome!r} is not one of {', '.join(sorted(_OUTCOMES))}"
            )
        if not self.actor or not self.action:
            raise InvalidArgumentError("an audit event needs an actor and an action")

    def fields(self) -> dict[str, Any]:
        """The event as the JSON object written to the log (before seq, prev and mac)."""
        return {
            "id": self.id,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "namespace": self.namespace,
            "outcome": self.outcome,
            "details": dict(self.details),
        }
