"""What a backend really gives each sandbox: namespaces, seccomp, cgroups, OverlayFS."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Less than these three is "degraded": production refuses to run sandboxes without all of them.
REQUIRED = ("namespaces", "seccomp", "cgroups")


@dataclass(frozen=True)
class Isolation:
    """The effective isolation of one backend; `reason` says why it is less than full, if it is.

    `overlayfs` is informative only: bwrap gives a read-only root with size-capped tmpfs mounts
    instead, which keeps the host's files just as safe.
    """

    backend: str  # "builtin" | "bwrap" | "none"
    namespaces: bool
    seccomp: bool
    cgroups: bool
    overlayfs: bool
    reason: str | None = None

    @property
    def degraded(self) -> bool:
        return not all(getattr(self, name) for name in REQUIRED)

    def missing(self) -> list[str]:
        return [name for name in REQUIRED if not getattr(self, name)]

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape stored on the sandbox's record and shown by the API."""
        fields = asdict(self)
        guarantees = {k: fields.pop(k) for k in ("namespaces", "seccomp", "cgroups", "overlayfs")}
        return {**fields, "guarantees": guarantees, "degraded": self.degraded}

    def describe(self) -> str:
        """One line for logs and readiness: the backend, and what it lacks and why."""
        if not self.degraded:
            return f"{self.backend}: namespaces, seccomp and cgroups"
        return f"{self.backend}: NO {', '.join(self.missing())} ({self.reason or 'unknown'})"
