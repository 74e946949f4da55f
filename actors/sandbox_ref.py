"""SandboxRef: the handle of a sandbox's host actor bound to that one sandbox.

A host actor runs many sandboxes of its node, at once and one after another, perhaps of other
tenants. Whoever holds a sandbox's handle (an API replica's cache, a driver, a client of
`RayCave.actor`) must reach that sandbox and nothing else, and nothing once it stopped. So
every call carries the ticket the sandbox was started with, which is how the host finds it; a
stopped sandbox's ticket gets `StaleTicketError` (a `SandboxStateError`, as if an actor of its
own had died). The ticket is a random secret the warm pool makes at start; no method returns it.

A ref reads like the actor handle it wraps: `ray.get(ref.run.remote("echo hi"))`.

Ray itself has no authentication between the processes of a cluster: the ticket protects a
sandbox from stale handles, not from a hostile Ray driver (docs/security.md).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from ray.actor import ActorHandle

from cave.errors import SandboxStateError

# The actor's methods that act on its current sandbox: each takes the ticket first.
TICKETED = frozenset(
    {
        "ping",
        "info",
        "exec",
        "run",
        "write_stdin",
        "close_stdin",
        "write_file",
        "read_file",
        "list_files",
        "delete_file",
        "stop",
    }
)


class StaleTicketError(SandboxStateError):
    """A call with the ticket of a sandbox that this actor no longer runs."""


def new_ticket() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class _BoundMethod:
    method: Any
    ticket: str = field(repr=False)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.method.remote(self.ticket, *args, **kwargs)

    def options(self, **options: Any) -> _BoundMethod:
        return _BoundMethod(self.method.options(**options), self.ticket)


@dataclass(frozen=True)
class SandboxRef:
    actor: ActorHandle
    ticket: str = field(repr=False)

    def __getattr__(self, name: str) -> _BoundMethod:
        # Only reached for names the dataclass does not hold: the actor's sandbox methods.
        if name not in TICKETED:
            raise AttributeError(f"a sandbox ref has no method {name!r}")
        return _BoundMethod(getattr(self.actor, name), self.ticket)

    def ready(self) -> Any:
        """An ObjectRef that resolves while the sandbox runs, and fails (RayActorError, or
        StaleTicketError once it stopped) when it does not."""
        return self.actor.ping.remote(self.ticket)
