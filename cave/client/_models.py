"""What the API returns, as frozen models: the fields of deployments/schemas.py, duplicated.

The client must work without the server's code, so nothing here imports from `deployments`.
Unknown fields are ignored (a newer server may add some); missing ones are an error.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

SandboxState = Literal[
    "created", "starting", "running", "stopping", "stopped", "failed", "lost", "deleted"
]
SANDBOX_STATES: tuple[SandboxState, ...] = (
    "created",
    "starting",
    "running",
    "stopping",
    "stopped",
    "failed",
    "lost",
    "deleted",
)
Scope = Literal[
    "sandboxes:read", "sandboxes:write", "keys:read", "keys:write", "llm:request", "audit:read"
]
KeyKind = Literal["admin", "namespace"]
SCOPES: tuple[Scope, ...] = (
    "sandboxes:read",
    "sandboxes:write",
    "keys:read",
    "keys:write",
    "llm:request",
    "audit:read",
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Limits(_Model):
    """Limits asked for at create; a field left None takes the operator's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mb: int | None = None
    pids: int | None = None
    cpu: float | None = None
    disk_mb: int | None = None
    timeout_s: float | None = None
    output_bytes: int | None = None


class LimitsInfo(_Model):
    """The limits a sandbox actually has, defaults filled in."""

    memory_mb: int
    pids: int
    cpu: float
    disk_mb: int
    timeout_s: float
    output_bytes: int


class Guarantees(_Model):
    """Which layers of isolation a sandbox has (see docs/isolation.md)."""

    namespaces: bool
    seccomp: bool
    cgroups: bool
    overlayfs: bool


class IsolationInfo(_Model):
    """The isolation a sandbox really got; `degraded` means namespaces, seccomp or cgroups is
    missing (a development server that could not isolate: never in production)."""

    backend: str
    guarantees: Guarantees
    degraded: bool
    reason: str | None = None


class SandboxInfo(_Model):
    id: str
    name: str
    namespace: str
    state: SandboxState
    node_id: str | None
    limits: LimitsInfo
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    stopped_at: datetime | None
    expires_at: datetime | None
    idle_timeout_s: float | None
    failure: str | None = None
    api_key_masked: str | None = None
    api_key: str | None = None
    """The sandbox's own API key in full: only in the answer to create."""
    isolation: IsolationInfo | None = None
    """Its isolation when last started (None: never started, or an older server)."""


class SandboxPage(_Model):
    items: list[SandboxInfo]
    next_cursor: str | None = None


class ExecResult(_Model):
    """How a command ended; after a stream, `stdout` and `stderr` are empty (sent as chunks)."""

    execution_id: str
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    timed_out: bool
    oom_killed: bool
    truncated: bool


class OutputChunk(_Model):
    """A piece of a streamed command's output, in the order the sandbox sent it."""

    stream: Literal["stdout", "stderr"]
    data: str


ExecEvent = OutputChunk | ExecResult
"""What `exec_stream` yields: chunks, then one result last."""


class FileWritten(_Model):
    path: str
    size: int


class FileEntry(_Model):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int


class FileList(_Model):
    path: str
    entries: list[FileEntry]


class ApiKey(_Model):
    id: str
    masked: str
    kind: KeyKind
    namespace: str | None
    scopes: list[str]
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    grace_until: datetime | None
    last_used_at: datetime | None
    rotated_from_id: str | None


class CreatedApiKey(ApiKey):
    key: str
    """The key in full: shown in this answer only."""


def limits_body(limits: Limits | dict[str, Any] | None) -> dict[str, Any]:
    """The `limits` object of a create request, without the fields left to defaults."""
    if limits is None:
        return {}
    if isinstance(limits, Limits):
        return limits.model_dump(exclude_none=True)
    return {key: value for key, value in limits.items() if value is not None}
