"""Typed CAVE settings (sandbox limits, isolation, pool), read from TOML and CAVE_* variables.

Each field declares its variable (cave/settings_env.py); the shipped TOML file gives the defaults,
and a variable, when set, wins over the file."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from cave.errors import ConfigError, InvalidArgumentError, LimitExceededError
from cave.settings_env import (
    Declared,
    Sources,
    declared,
    describe,
    env_field,
    env_prefix,
    is_production,
    read_env,
)

DEFAULT_TOML_PATH = Path(__file__).parent / "sandbox_config.toml"

_MIB = 1024 * 1024
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid" to the kernel

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Backend = Literal["auto", "builtin", "bwrap", "none"]


class SandboxLimits(BaseModel, frozen=True, extra="forbid"):
    """Resource limits of one sandbox: memory and disk in MiB, times in seconds."""

    memory_mb: PositiveInt = Field(description="Memory limit in MiB (cgroup `memory.max`)")
    pids: PositiveInt = Field(description="Most processes and threads at once (cgroup `pids.max`)")
    cpu: PositiveFloat = Field(
        description="CPUs' worth of time, may be fractional (cgroup `cpu.max`)"
    )
    disk_mb: PositiveInt = Field(description="Writable workspace size in MiB")
    timeout_s: PositiveFloat = Field(description="Wall-clock seconds before a command is killed")
    output_bytes: PositiveInt = Field(description="Bytes of stdout and stderr kept per command")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * _MIB

    @property
    def disk_bytes(self) -> int:
        return self.disk_mb * _MIB


class LimitOverrides(BaseModel, frozen=True, extra="forbid"):
    """Limits a caller asks for; a field left None keeps the configured default. The API's
    request body is this model (deployments/schemas.py: Limits), as are the CLI's and MCP's."""

    memory_mb: PositiveInt | None = None
    pids: PositiveInt | None = None
    cpu: PositiveFloat | None = None
    disk_mb: PositiveInt | None = None
    timeout_s: PositiveFloat | None = None
    output_bytes: PositiveInt | None = None


class IsolationSettings(BaseModel, frozen=True, extra="forbid"):
    """How a node isolates its sandboxes."""

    # CAVE_ENV=production (cave.settings_env.CaveEnvironment): refuse to run sandboxes with less
    # than namespaces + seccomp + cgroups. Declared first so that the backend's validator sees it.
    production: bool = False
    backend: Backend = env_field(
        "CAVE_ISOLATION_BACKEND",
        description=(
            "`builtin` (namespaces, cgroups, seccomp done by CAVE), `bwrap` (bubblewrap), "
            "`none` (no isolation; development only, refused in production), or `auto` (the "
            "strongest one that works on the node)"
        ),
    )
    bwrap_path: str | None = env_field(
        "CAVE_BWRAP_PATH",
        None,
        shown_default="empty",
        description="Path of `bwrap`; empty looks it up on `PATH`",
    )
    cgroup_root: str = env_field(
        "CAVE_CGROUP_ROOT",
        accepts="a relative cgroup path",
        description=(
            "cgroup v2 path the sandboxes' cgroups are created under; no leading `/`, no `..`"
        ),
    )
    no_fallback: bool = env_field(
        "CAVE_ISOLATION_NO_FALLBACK",
        description=(
            "`true`: fail with `IsolationUnavailableError` rather than fall back to a weaker "
            "backend. `CAVE_ENV=production` always refuses, whatever this says"
        ),
    )
    state_dir: Path = env_field(
        "CAVE_STATE_DIR",
        accepts="an absolute path",
        description="Where a node keeps sandbox workspaces and runtime state",
    )
    rootfs: Path | None = env_field(
        "CAVE_ROOTFS",
        accepts="an absolute path, or empty",
        shown_default="empty",
        description=("A root filesystem for sandboxes; empty composes one from the host's `/usr`"),
    )
    sandbox_uid: int = env_field(
        "CAVE_SANDBOX_UID",
        gt=0,
        le=_MAX_UID,
        description="Host uid a sandbox's processes run as",
    )

    @field_validator("bwrap_path", "rootfs", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # TOML has no null: an empty string means "not set".
        return None if value == "" else value

    @field_validator("backend")
    @classmethod
    def _isolating_in_production(cls, value: str, info: ValidationInfo) -> str:
        if value == "none" and info.data.get("production"):
            raise ValueError("CAVE_ENV=production refuses to run sandboxes without isolation")
        return value

    @field_validator("cgroup_root")
    @classmethod
    def _relative_cgroup(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not path.parts or path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a relative cgroup path without '..'")
        return value

    @field_validator("state_dir", "rootfs")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Ray workers do not share the driver's working directory.
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class PoolSettings(BaseModel, frozen=True, extra="forbid"):
    """Warm sandboxes kept ready on each node."""

    size_per_node: int = env_field(
        "CAVE_POOL_SIZE",
        ge=0,
        description=(
            "Spare sandboxes each node keeps prepared at least, however quiet; 0 keeps none "
            "when idle (under demand the pool still prepares spares after stops)"
        ),
    )
    max_per_node: int = env_field(
        "CAVE_POOL_MAX",
        ge=0,
        description=(
            "Most spares a node keeps: under demand the pool grows toward the creates of the "
            "last `idle_s` (by preparing one after each stop), never beyond this; a spare "
            "costs its sandbox's own processes (a few MiB), no Ray worker"
        ),
    )
    idle_s: float = env_field(
        "CAVE_POOL_IDLE_S",
        gt=0,
        description=(
            "Demand is what was created in this many seconds; after this long without a create "
            "the pool shrinks back to `size_per_node`"
        ),
    )
    max_incarnations: int = env_field(
        "CAVE_POOL_MAX_INCARNATIONS",
        ge=1,
        description=(
            "Sandboxes one host actor starts before it takes no more and ends once its last "
            "one stopped (bounds what a long-lived worker process could accumulate)"
        ),
    )
    hosts_per_node: int = env_field(
        "CAVE_POOL_HOSTS",
        ge=1,
        description=(
            "Host actors each node keeps up to run its sandboxes (each a Ray worker, about "
            "55 MiB); more spread a node's sandboxes over more processes and cores, so that a "
            "burst goes faster and one crash loses fewer"
        ),
    )


class PlacementSettings(BaseModel, frozen=True, extra="forbid"):
    """Where sandboxes go: see docs/placement.md."""

    max_per_node: int | None = env_field(
        "CAVE_MAX_SANDBOXES_PER_NODE",
        None,
        ge=1,
        blank_is_unset=True,
        shown_default="unset: from the node's memory",
        description=(
            "Most sandboxes on a node that does not declare its own number (its `cave_sandbox` "
            "resource); unset, a node takes as many default sandboxes as its Ray `memory` x "
            "`memory_overcommit` holds; see placement.md"
        ),
    )
    max_wait_s: float = env_field(
        "CAVE_PLACEMENT_MAX_WAIT_S",
        ge=0,
        le=3600,
        description=(
            "The most a create's `wait_s` may ask for (waiting for room while the autoscaler "
            "adds a node)"
        ),
    )
    restricted_pools: tuple[str, ...] = Field(
        ("trusted",),
        description="Node pools (label `cave.pool`) that take sandboxes of admin keys only",
    )
    # Limits are ceilings that most sandboxes never reach (docs/placement.md).
    memory_overcommit: float = env_field(
        "CAVE_MEMORY_OVERCOMMIT",
        4.0,
        gt=0,
        le=100,
        description=(
            "A node takes sandboxes whose memory limits add up to its Ray `memory` resource "
            "x this; see placement.md"
        ),
    )


class QuotaSettings(BaseModel, frozen=True, extra="forbid"):
    """Per-namespace defaults (an admin overrides them per namespace), see docs/sandboxes.md."""

    sandboxes: int = env_field(
        "CAVE_QUOTA_SANDBOXES",
        32,
        ge=0,
        description="Sandboxes created and not yet stopped; see sandboxes.md",
    )
    memory_mb: int = env_field(
        "CAVE_QUOTA_MEMORY_MB", 32768, ge=0, description="Their memory limits added up (MiB)"
    )
    cpu: float = env_field(
        "CAVE_QUOTA_CPU", 32.0, ge=0, allow_inf_nan=False, description="Their CPU limits added up"
    )
    concurrent_execs: int = env_field(
        "CAVE_QUOTA_CONCURRENT_EXECS",
        64,
        ge=0,
        description="Execs running at once, counted by each API replica",
    )
    default_ttl_s: float = env_field(
        "CAVE_DEFAULT_TTL_S",
        3600.0,
        ge=0,
        le=30 * 86400,
        description="ttl of a sandbox created without one; 0: none",
    )
    default_idle_timeout_s: float = env_field(
        "CAVE_DEFAULT_IDLE_TIMEOUT_S",
        900.0,
        ge=0,
        le=30 * 86400,
        description="Idle timeout of a sandbox created without one; 0: none",
    )


class _AboveMaximumError(ValueError):
    """A default limit is above its maximum; carries the field so the loader can name its source."""

    def __init__(self, key: str, default: float, maximum: float) -> None:
        super().__init__(f"defaults.{key}={default} is above maximum.{key}={maximum}")
        self.key, self.default, self.maximum = key, default, maximum


class Settings(BaseModel, frozen=True, extra="forbid"):
    """Everything configurable about sandboxes; built once at the entry point and passed down."""

    defaults: SandboxLimits = env_prefix(
        "CAVE_DEFAULT_",
        title="Sandbox limits: defaults",
        description="Limits a sandbox gets when the caller asks for nothing else.",
    )
    maximum: SandboxLimits = env_prefix(
        "CAVE_MAX_",
        title="Sandbox limits: maximum",
        description="Ceilings: a caller may raise a limit up to these, never above.",
    )
    isolation: IsolationSettings = Field(title="Isolation")
    pool: PoolSettings = Field(title="Warm pool")
    placement: PlacementSettings = Field(title="Placement")
    quotas: QuotaSettings = Field(QuotaSettings(), title="Namespace quotas")

    @model_validator(mode="after")
    def _defaults_within_maximum(self) -> Self:
        for key in SandboxLimits.model_fields:
            default, maximum = getattr(self.defaults, key), getattr(self.maximum, key)
            if default > maximum:
                raise _AboveMaximumError(key, default, maximum)
        return self


def load_settings(env: Mapping[str, str] | None = None, toml_path: Path | None = None) -> Settings:
    """Read the TOML file, apply CAVE_* overrides from `env` (default os.environ), validate."""
    path = DEFAULT_TOML_PATH if toml_path is None else toml_path
    env = os.environ if env is None else env
    values, sources = read_env(Settings, env, base=_read_toml(path))
    if "CAVE_ENV" in env:
        values.setdefault("isolation", {})["production"] = is_production(env)
        sources[("isolation", "production")] = ("CAVE_ENV", env["CAVE_ENV"])
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        by_loc = {item.loc: item for item in declared(Settings)}
        problems = [_describe(error, path, sources, by_loc) for error in exc.errors()]
        raise ConfigError("; ".join(problems)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read settings file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    for name, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {name} must be a table ([{name}])")
    return data


def _describe(
    error: ErrorDetails, path: Path, sources: Sources, by_loc: dict[tuple[str, ...], Declared]
) -> str:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _AboveMaximumError):
        default = _origin(("defaults", cause.key), path, sources)
        maximum = _origin(("maximum", cause.key), path, sources)
        return (
            f"default {cause.key}={cause.default} ({default}) "
            f"is above its maximum {cause.maximum} ({maximum})"
        )
    return describe(error, sources, by_loc, origin=str(path))


def _message(error: ErrorDetails) -> str:
    # Our own validators' words, without pydantic's "Value error, " prefix.
    cause = error.get("ctx", {}).get("error")
    return str(cause) if isinstance(cause, ValueError) else error["msg"]


def _origin(field: tuple[str, ...], path: Path, sources: Sources) -> str:
    if field in sources:
        return sources[field][0]
    return f"{field[0]}.{field[1]} in {path}"


def resolve_limits(overrides: LimitOverrides | None, settings: Settings) -> SandboxLimits:
    """The defaults with each given override applied; an override above its maximum is refused."""
    given = {} if overrides is None else overrides.model_dump(exclude_none=True)
    for key, value in given.items():
        maximum = getattr(settings.maximum, key)
        if value > maximum:
            raise LimitExceededError(f"{key}={value} is above the maximum {maximum}")
    return SandboxLimits.model_validate({**settings.defaults.model_dump(), **given})


def parse_overrides(**values: object) -> LimitOverrides:
    """Build LimitOverrides from caller input, as InvalidArgumentError when a value is bad."""
    try:
        return LimitOverrides.model_validate(values)
    except ValidationError as exc:
        problems = [_override_problem(error) for error in exc.errors()]
        raise InvalidArgumentError("; ".join(problems)) from None


def _override_problem(error: ErrorDetails) -> str:
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "greater_than":
        return f"{field} must be > {error.get('ctx', {}).get('gt', 0):g}, got {error['input']!r}"
    if error["type"] == "extra_forbidden":
        return f"{field} is not a sandbox limit (known: {', '.join(LimitOverrides.model_fields)})"
    return f"{field}: {_message(error)} (got {error['input']!r})"
