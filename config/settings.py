"""Typed CAVE settings (sandbox limits, isolation, pool), read from TOML and CAVE_* variables."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from cave.env import parse_bool, parse_choice
from cave.errors import ConfigError, InvalidArgumentError, LimitExceededError

DEFAULT_TOML_PATH = Path(__file__).parent / "sandbox_config.toml"

_MIB = 1024 * 1024
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid" to the kernel

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Backend = Literal["auto", "builtin", "bwrap", "none"]


class SandboxLimits(BaseModel, frozen=True, extra="forbid"):
    """Resource limits of one sandbox: memory and disk in MiB, times in seconds."""

    memory_mb: PositiveInt
    pids: PositiveInt
    cpu: PositiveFloat
    disk_mb: PositiveInt
    timeout_s: PositiveFloat
    output_bytes: PositiveInt

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * _MIB

    @property
    def disk_bytes(self) -> int:
        return self.disk_mb * _MIB


class LimitOverrides(BaseModel, frozen=True, extra="forbid"):
    """Limits a caller asks for; a field left None keeps the configured default."""

    memory_mb: PositiveInt | None = None
    pids: PositiveInt | None = None
    cpu: PositiveFloat | None = None
    disk_mb: PositiveInt | None = None
    timeout_s: PositiveFloat | None = None
    output_bytes: PositiveInt | None = None


class IsolationSettings(BaseModel, frozen=True, extra="forbid"):
    """How a node isolates its sandboxes."""

    # CAVE_ENV=production: refuse to run sandboxes with less than namespaces + seccomp + cgroups.
    # Declared first so that the backend's validator sees it.
    production: bool = False
    backend: Backend
    bwrap_path: str | None = None
    cgroup_root: str
    no_fallback: bool
    state_dir: Path
    rootfs: Path | None
    sandbox_uid: int = Field(gt=0, le=_MAX_UID)

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

    size_per_node: int = Field(ge=0)


class PlacementSettings(BaseModel, frozen=True, extra="forbid"):
    """Where sandboxes go: see docs/placement.md."""

    # Most sandboxes on a node that does not say itself (its `cave_sandbox` resource amount).
    max_per_node: int = Field(ge=1)
    # Longest a create may wait for room (`wait_s`) while the autoscaler adds a node.
    max_wait_s: float = Field(ge=0, le=3600)
    # Pools only an admin key may place sandboxes in (node label `cave.pool`).
    restricted_pools: tuple[str, ...] = ("trusted",)
    # A node takes sandboxes whose memory limits add up to at most its Ray `memory` resource
    # times this: limits are ceilings that most sandboxes never reach (docs/placement.md).
    memory_overcommit: float = Field(2.0, gt=0, le=100)


class QuotaSettings(BaseModel, frozen=True, extra="forbid"):
    """Per-namespace defaults (an admin overrides them per namespace), see docs/sandboxes.md."""

    sandboxes: int = Field(32, ge=0)  # sandboxes created and not yet stopped
    memory_mb: int = Field(32768, ge=0)  # their memory limits added up
    cpu: float = Field(32.0, ge=0, allow_inf_nan=False)  # their CPU limits added up
    concurrent_execs: int = Field(64, ge=0)  # execs running at once, counted by each replica
    # A sandbox created without ttl_s / idle_timeout_s gets these; 0: none.
    default_ttl_s: float = Field(3600.0, ge=0, le=30 * 86400)
    default_idle_timeout_s: float = Field(900.0, ge=0, le=30 * 86400)


class _AboveMaximumError(ValueError):
    """A default limit is above its maximum; carries the field so the loader can name its source."""

    def __init__(self, key: str, default: float, maximum: float) -> None:
        super().__init__(f"defaults.{key}={default} is above maximum.{key}={maximum}")
        self.key, self.default, self.maximum = key, default, maximum


class Settings(BaseModel, frozen=True, extra="forbid"):
    """Everything configurable about sandboxes; built once at the entry point and passed down."""

    defaults: SandboxLimits
    maximum: SandboxLimits
    isolation: IsolationSettings
    pool: PoolSettings
    placement: PlacementSettings
    quotas: QuotaSettings = QuotaSettings()

    @model_validator(mode="after")
    def _defaults_within_maximum(self) -> Self:
        for key in SandboxLimits.model_fields:
            default, maximum = getattr(self.defaults, key), getattr(self.maximum, key)
            if default > maximum:
                raise _AboveMaximumError(key, default, maximum)
        return self


def _integer(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


def _positive_int(raw: str) -> int:
    value = _integer(raw)
    if value is None or value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = _integer(raw)
    if value is None or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError("expected a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("expected a non-negative number")
    return value


def _backend(raw: str) -> str:
    return parse_choice(raw, get_args(Backend))


def _is_production(raw: str) -> bool:
    return raw.strip().lower() == "production"  # as cave/auth/settings.py reads CAVE_ENV


_LIMIT_PARSERS: dict[str, Callable[[str], object]] = {
    "memory_mb": _positive_int,
    "pids": _positive_int,
    "cpu": _positive_float,
    "disk_mb": _positive_int,
    "timeout_s": _positive_float,
    "output_bytes": _positive_int,
}

# variable -> (TOML section, key, parser); strings and paths are checked by the models.
ENV_VARIABLES: dict[str, tuple[str, str, Callable[[str], object]]] = {
    **{f"CAVE_DEFAULT_{k.upper()}": ("defaults", k, p) for k, p in _LIMIT_PARSERS.items()},
    **{f"CAVE_MAX_{k.upper()}": ("maximum", k, p) for k, p in _LIMIT_PARSERS.items()},
    "CAVE_ENV": ("isolation", "production", _is_production),
    "CAVE_ISOLATION_BACKEND": ("isolation", "backend", _backend),
    "CAVE_BWRAP_PATH": ("isolation", "bwrap_path", str),
    "CAVE_CGROUP_ROOT": ("isolation", "cgroup_root", str),
    "CAVE_ISOLATION_NO_FALLBACK": ("isolation", "no_fallback", parse_bool),
    "CAVE_STATE_DIR": ("isolation", "state_dir", str),
    "CAVE_ROOTFS": ("isolation", "rootfs", str),
    "CAVE_SANDBOX_UID": ("isolation", "sandbox_uid", _positive_int),
    "CAVE_POOL_SIZE": ("pool", "size_per_node", _non_negative_int),
    "CAVE_MAX_SANDBOXES_PER_NODE": ("placement", "max_per_node", _positive_int),
    "CAVE_PLACEMENT_MAX_WAIT_S": ("placement", "max_wait_s", _positive_float),
    "CAVE_MEMORY_OVERCOMMIT": ("placement", "memory_overcommit", _positive_float),
    "CAVE_QUOTA_SANDBOXES": ("quotas", "sandboxes", _non_negative_int),
    "CAVE_QUOTA_MEMORY_MB": ("quotas", "memory_mb", _non_negative_int),
    "CAVE_QUOTA_CPU": ("quotas", "cpu", _non_negative_float),
    "CAVE_QUOTA_CONCURRENT_EXECS": ("quotas", "concurrent_execs", _non_negative_int),
    "CAVE_DEFAULT_TTL_S": ("quotas", "default_ttl_s", _non_negative_float),
    "CAVE_DEFAULT_IDLE_TIMEOUT_S": ("quotas", "default_idle_timeout_s", _non_negative_float),
}

# (section, key) -> (variable, raw value) for every setting taken from the environment
_Sources = dict[tuple[str, str], tuple[str, str]]


def load_settings(env: Mapping[str, str] | None = None, toml_path: Path | None = None) -> Settings:
    """Read the TOML file, apply CAVE_* overrides from `env` (default os.environ), validate."""
    path = DEFAULT_TOML_PATH if toml_path is None else toml_path
    raw = _read_toml(path)
    sources = _apply_env(raw, os.environ if env is None else env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, path, sources) for error in exc.errors()]
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


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> _Sources:
    sources: _Sources = {}
    for variable, (section, key, parse) in ENV_VARIABLES.items():
        if variable not in env:
            continue
        try:
            value = parse(env[variable])
        except ValueError as exc:
            raise ConfigError(f"{variable}={env[variable]!r}: {exc}") from None
        raw.setdefault(section, {})[key] = value
        sources[(section, key)] = (variable, env[variable])
    return sources


def _describe(error: ErrorDetails, path: Path, sources: _Sources) -> str:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _AboveMaximumError):
        default = _origin(("defaults", cause.key), path, sources)
        maximum = _origin(("maximum", cause.key), path, sources)
        return (
            f"default {cause.key}={cause.default} ({default}) "
            f"is above its maximum {cause.maximum} ({maximum})"
        )
    loc = tuple(str(part) for part in error["loc"])
    if loc[:2] in sources:
        variable, value = sources[(loc[0], loc[1])]
        return f"{variable}={value!r}: {_message(error)}"
    shown = "" if error["type"] == "missing" else f"={error['input']!r}"
    return f"{path}: {'.'.join(loc)}{shown}: {_message(error)}"


def _message(error: ErrorDetails) -> str:
    # Our own validators' words, without pydantic's "Value error, " prefix.
    cause = error.get("ctx", {}).get("error")
    return str(cause) if isinstance(cause, ValueError) else error["msg"]


def _origin(field: tuple[str, str], path: Path, sources: _Sources) -> str:
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
