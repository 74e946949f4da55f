"""Which models exist and how they are served: `ModelSpec`s read from a TOML file.

The file is config/models.toml unless `CAVE_MODELS_FILE` names another; each model is one
`[[models]]` table. A relative `source` of a CPU model is read from the file's directory.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cave.errors import ConfigError, NotFoundError

ENGINES = ("cpu", "vllm")
MODELS_FILE_ENV = "CAVE_MODELS_FILE"
DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[1] / "config" / "models.toml"
# Model ids appear in URLs, JWT claims and Serve deployment names: keep them plain.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")


@dataclass(frozen=True)
class ModelSpec:
    """One served model. `source`: a model directory (cpu), or a directory or a Hugging Face
    id (vllm). The GPU fields apply to vLLM only."""

    model_id: str
    engine: str
    source: str
    accelerator_type: str | None = None  # a Ray accelerator type: "H100", "A10G", "L4", ...
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1

    def __post_init__(self) -> None:
        _check_spec(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from a dict (a TOML table); `path` is accepted for `source`. Raises ConfigError."""
        fields = dict(data)
        if "path" in fields and "source" not in fields:
            fields["source"] = fields.pop("path")
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"model {fields.get('model_id')!r}: unknown keys {sorted(unknown)}")
        try:
            return cls(**fields)
        except TypeError as exc:  # a required key is missing
            raise ConfigError(f"model {fields.get('model_id')!r}: {exc}") from None


def _check_spec(spec: ModelSpec) -> None:
    name = f"model {spec.model_id!r}"
    if not isinstance(spec.model_id, str) or not _MODEL_ID.fullmatch(spec.model_id):
        raise ConfigError(f"{name}: model_id must match {_MODEL_ID.pattern}")
    if spec.engine not in ENGINES:
        raise ConfigError(f"{name}: engine must be one of {list(ENGINES)}")
    if not isinstance(spec.source, str) or not spec.source:
        raise ConfigError(f"{name}: source must name a model directory or id")
    for field, value, least in [
        ("tensor_parallel_size", spec.tensor_parallel_size, 1),
        ("max_model_len", spec.max_model_len, 1),
        ("min_replicas", spec.min_replicas, 0),
        ("max_replicas", spec.max_replicas, 1),
    ]:
        if value is not None and (type(value) is not int or value < least):
            raise ConfigError(f"{name}: {field} must be an integer of at least {least}")
    if spec.min_replicas > spec.max_replicas:
        raise ConfigError(f"{name}: min_replicas is above max_replicas")
    if spec.engine == "cpu":
        _check_cpu_spec(spec, name)
    elif spec.accelerator_type is not None:
        _check_accelerator_type(spec.accelerator_type, name)


def _check_cpu_spec(spec: ModelSpec, name: str) -> None:
    if spec.accelerator_type is not None or spec.tensor_parallel_size != 1:
        raise ConfigError(f"{name}: accelerator_type and tensor_parallel_size are vLLM settings")


def _check_accelerator_type(value: str, name: str) -> None:
    # Ray's own list: its name becomes the `accelerator_type:<value>` resource that GPU nodes carry.
    from ray.util.accelerators import accelerators

    known = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    if value not in known:
        raise ConfigError(f"{name}: accelerator_type {value!r} is not one of Ray's {sorted(known)}")


def models_file(env: Mapping[str, str]) -> Path:
    return Path(env[MODELS_FILE_ENV]) if env.get(MODELS_FILE_ENV) else DEFAULT_MODELS_FILE


def load_models(path: Path) -> list[ModelSpec]:
    """Read the `[[models]]` tables of a TOML file; anything malformed raises ConfigError."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{MODELS_FILE_ENV}={path}: {exc}") from None
    tables = document.get("models", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{MODELS_FILE_ENV}={path}: `models` must be [[models]] tables")
    try:
        specs = [_resolved(ModelSpec.from_dict(table), path.parent) for table in tables]
    except ConfigError as exc:
        raise ConfigError(f"{MODELS_FILE_ENV}={path}: {exc}") from None
    return specs


def _resolved(spec: ModelSpec, base: Path) -> ModelSpec:
    if spec.engine != "cpu" or Path(spec.source).is_absolute():
        return spec
    return dataclasses.replace(spec, source=str((base / spec.source).resolve()))


class ModelRegistry:
    """The models this cluster serves, by id."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.model_id in self._specs:
                raise ConfigError(f"model {spec.model_id!r} is listed twice")
            self._specs[spec.model_id] = spec

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ModelRegistry:
        return cls(load_models(models_file(env)))

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            raise NotFoundError(f"no model {model_id!r} is registered") from None

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def ids(self) -> list[str]:
        return sorted(self._specs)
