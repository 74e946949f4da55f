"""The API's request and response bodies (pydantic): what clients send and get, never a row."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from config.settings import LimitOverrides

NAMESPACE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
Namespace = Annotated[str, Field(pattern=NAMESPACE_PATTERN, examples=["team-a"])]
SandboxState = Literal[
    "created", "starting", "running", "stopping", "stopped", "failed", "lost", "deleted"
]
Scope = Literal[
    "sandboxes:read", "sandboxes:write", "keys:read", "keys:write", "llm:request", "audit:read"
]


class _Body(BaseModel):
    """Unknown fields are an error (422), not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Limits(LimitOverrides):
    """Per-sandbox limits; unset fields take the operator's defaults (CAVE_DEFAULT_*)."""


class LimitsOut(BaseModel):
    memory_mb: int
    pids: int
    cpu: float
    disk_mb: int
    timeout_s: float
    output_bytes: int


class CreateSandboxRequest(_Body):
    name: str = Field("", max_length=128)
    namespace: Namespace | None = Field(
        None, description="Admin keys only; a namespace key always creates in its own namespace."
    )
    limits: Limits = Field(default_factory=Limits)
    labels: dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=256)]] = (
        Field(default_factory=dict, max_length=64)
    )
    ttl_s: float | None = Field(
        None, gt=0, le=30 * 86400, description="Stopped this long after start."
    )
    idle_timeout_s: float | None = Field(
        None,
        gt=0,
        le=30 * 86400,
        description="Stopped after this long without an exec or file call.",
    )
    start: bool = Field(True, description="False records the sandbox in state `created` only.")
    wait_s: float = Field(
        0,
        ge=0,
        le=3600,
        description="When every node of its pool is full, wait this long for room (and ask the "
        "autoscaler for a node) instead of failing at once with 429. At most the server's "
        "`placement.max_wait_s`.",
    )


class GuaranteesOut(BaseModel):
    namespaces: bool = Field(description="Own user, pid, mount, net, ipc and uts namespaces.")
    seccomp: bool = Field(description="The seccomp filter on every command.")
    cgroups: bool = Field(description="Memory, pids and CPU limits enforced by a cgroup.")
    overlayfs: bool = Field(
        description="A private overlay root (builtin); bwrap gives a read-only root with tmpfs."
    )


class IsolationOut(BaseModel):
    """What isolation the sandbox really got, as the actor that runs it reported."""

    backend: Literal["builtin", "bwrap", "none"]
    guarantees: GuaranteesOut
    degraded: bool = Field(
        description="True when namespaces, seccomp or cgroups is missing: never in production."
    )
    reason: str | None = Field(None, description="Why it is degraded.")


class SandboxOut(BaseModel):
    id: str
    name: str
    namespace: str
    state: SandboxState
    node_id: str | None
    limits: LimitsOut
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    stopped_at: datetime | None
    expires_at: datetime | None
    idle_timeout_s: float | None
    failure: str | None = None
    api_key_masked: str | None = Field(None, description="The sandbox's own API key, masked.")
    isolation: IsolationOut | None = Field(
        None, description="Its isolation when last started; null when it never started."
    )


class CreatedSandboxOut(SandboxOut):
    api_key: str | None = Field(
        None, description="The sandbox's own API key in full: shown in this response only."
    )


class SandboxPage(BaseModel):
    items: list[SandboxOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class ExecRequest(_Body):
    command: str | list[str] = Field(
        description="A shell string (run by /bin/sh -c) or an argv list.", examples=["echo hi"]
    )
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    stdin: str | None = Field(None, description="Text written to the command's stdin.")
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _spellable(self) -> ExecRequest:
        """A command receives bytes: a non-UTF-8 byte travels as a lone surrogate escape
        (\\udc80-\\udcff, as os.fsencode spells it), but no bytes spell any other lone
        surrogate, so a command naming one could never start: refused here, before a stream."""
        argv = [self.command] if isinstance(self.command, str) else self.command
        for text in [*argv, *self.env, *self.env.values(), self.cwd or ""]:
            try:
                text.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError as exc:
                bad = text[exc.start]
                raise ValueError(
                    f"{bad!a} is a lone surrogate that no bytes spell: a command can receive "
                    "only bytes (non-UTF-8 bytes travel as \\udc80-\\udcff)"
                ) from None
        return self


class ExecOut(BaseModel):
    execution_id: str
    exit_code: int
    stdout: str = Field(description="UTF-8, undecodable bytes replaced.")
    stderr: str
    duration_ms: int
    timed_out: bool
    oom_killed: bool
    truncated: bool = Field(
        description="Output was dropped: past the sandbox's `output_bytes`, or, in a "
        "non-streamed exec, past the API's inline cap per stream (CAVE_API_EXEC_OUTPUT_BYTES, "
        "4 MiB); a streamed exec returns up to `output_bytes`."
    )


class ExecEvent(BaseModel):
    """One NDJSON line, SSE event or WebSocket message of a streamed exec."""

    type: Literal["started", "stdout", "stderr", "result", "error"]
    data: str | None = None
    execution_id: str | None = Field(None, description="On `started` (WebSocket): the exec's id.")
    result: ExecOut | None = None
    error: ErrorBody | None = None


class FileWritten(BaseModel):
    path: str
    size: int


class FileEntryOut(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int


class FileList(BaseModel):
    path: str
    entries: list[FileEntryOut]


class CreateKeyRequest(_Body):
    kind: Literal["admin", "namespace"] = "namespace"
    namespace: Namespace | None = None
    scopes: list[Scope] = Field(default_factory=list)
    name: str = Field("", max_length=128)
    # Bounded so that a huge value is a 422, not an overflowing datetime (500).
    ttl_s: float | None = Field(
        None, gt=0, le=10 * 365 * 86400, description="The key expires this long after creation."
    )


class RotateKeyRequest(_Body):
    grace_s: float | None = Field(
        None,
        ge=0,
        le=30 * 86400,
        description="How long the old key keeps working (default from settings).",
    )


class KeyOut(BaseModel):
    id: str
    masked: str
    kind: Literal["admin", "namespace"]
    namespace: str | None
    scopes: list[str]
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    grace_until: datetime | None
    last_used_at: datetime | None
    rotated_from_id: str | None


class CreatedKeyOut(KeyOut):
    key: str = Field(description="The key in full: shown in this response only.")


class KeyList(BaseModel):
    items: list[KeyOut]


class WebhookReceived(BaseModel):
    event_id: str
    topic: str
    duplicate: bool = Field(False, description="Already received once: nothing was done again.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    isolation: dict[str, IsolationOut] = Field(
        default_factory=dict, description="/readyz: what each sandbox node's sandboxes get."
    )


class ErrorBody(BaseModel):
    code: str = Field(examples=["sandbox_not_found"])
    message: str
    request_id: str
    details: list[dict[str, object]] | None = Field(
        None, description="Validation errors: one entry per field, with its location."
    )


class ErrorOut(BaseModel):
    error: ErrorBody


ExecEvent.model_rebuild()


PoolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")]


class NamespaceQuotas(_Body):
    """A namespace's quotas; a field null or left out is the server's default (settings
    [quotas]). 0 refuses every new sandbox (or exec) of the namespace."""

    sandboxes: int | None = Field(
        None, ge=0, le=1_000_000, description="Sandboxes created and not yet stopped."
    )
    memory_mb: int | None = Field(
        None, ge=0, le=2**40, description="Memory limits of those sandboxes added up, in MiB."
    )
    cpu: float | None = Field(
        None,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="CPU limits of those sandboxes added up.",
    )
    concurrent_execs: int | None = Field(
        None, ge=0, le=1_000_000, description="Execs running at once (counted by each replica)."
    )


class QuotaUsage(BaseModel):
    """What the namespace's sandboxes created and not yet stopped hold now."""

    sandboxes: int
    memory_mb: int
    cpu: float


class NamespaceSettings(_Body):
    pool: PoolName | None = Field(
        None,
        description="The node pool (Ray node label `cave.pool`) this namespace's sandboxes go "
        "to when they ask for none; null: the default pool. A namespace assigned a restricted "
        "pool (`trusted`) may place sandboxes there with its own keys.",
        examples=["trusted"],
    )
    quotas: NamespaceQuotas | None = Field(
        None,
        description="Replaces the namespace's quota overrides (a field null or left out: the "
        "default). A field of this body left out leaves that setting as it is.",
    )


class NamespaceOut(BaseModel):
    name: str
    pool: str | None
    created_at: datetime
    quotas: NamespaceQuotas = Field(description="The quotas in force (defaults filled in).")
    overrides: NamespaceQuotas = Field(description="What an admin set; null: the default.")
    usage: QuotaUsage | None = Field(None, description="Given by GET of one namespace.")


class NamespaceList(BaseModel):
    items: list[NamespaceOut]
