"""Which models exist and how they are served: `ModelSpec`s from a TOML file or the database.

The file is config/models.toml unless `CAVE_MODELS_FILE` names another; each model is one
`[[models]]` table. A relative `source` of a CPU model is read from the file's directory. Models
added through the admin API live in the `registered_models` table (`RegisteredModels`); the
file's models are read-only over the API.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from cave.db import Database
from cave.db.models import RegisteredModelRow
from cave.errors import ConfigError, NotFoundError
from cave.settings_env import load_section
from config.api import ModelsSettings

log = logging.getLogger(__name__)
_Fail = Callable[[str, str], "ModelSpecError"]

ENGINES = ("cpu", "vllm")
MODELS_FILE_ENV = "CAVE_MODELS_FILE"  # config.api.ModelsSettings; named in the errors below
# Model ids appear in URLs, JWT claims and Serve deployment names: keep them plain.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")
MODEL_ID_PATTERN = _MODEL_ID.pattern


class ModelSpecError(ConfigError):
    """One field of a model's spec is malformed; `field` names it, so that the API can answer
    with the field's path and the file loader with the model's name."""

    def __init__(self, model_id: object, field: str, reason: str) -> None:
        super().__init__(f"model {model_id!r}: {reason}")
        self.args = (model_id, field, reason)  # pickles as cls(*args), across Ray processes
        self.field = field
        self.reason = reason


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
    # cpu engine only: GPUs each replica reserves (Ray places it on a node that has them, and
    # the engine runs on CUDA there). vLLM takes one GPU per tensor-parallel worker instead.
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        _check_spec(self)
        object.__setattr__(self, "num_gpus", float(self.num_gpus))  # TOML may say 1, not 1.0

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
    def fail(field: str, reason: str) -> ModelSpecError:
        return ModelSpecError(spec.model_id, field, reason)

    if not isinstance(spec.model_id, str) or not _MODEL_ID.fullmatch(spec.model_id):
        raise fail("model_id", f"model_id must match {_MODEL_ID.pattern}")
    if spec.engine not in ENGINES:
        raise fail("engine", f"engine must be one of {list(ENGINES)}")
    if not isinstance(spec.source, str) or not spec.source:
        raise fail("source", "source must name a model directory or id")
    for field, value, least in [
        ("tensor_parallel_size", spec.tensor_parallel_size, 1),
        ("max_model_len", spec.max_model_len, 1),
        ("min_replicas", spec.min_replicas, 0),
        ("max_replicas", spec.max_replicas, 1),
    ]:
        if value is not None and (type(value) is not int or value < least):
            raise fail(field, f"{field} must be an integer of at least {least}")
    if spec.min_replicas > spec.max_replicas:
        raise fail("min_replicas", "min_replicas is above max_replicas")
    _check_num_gpus(spec, fail)
    if spec.engine == "cpu":
        if spec.accelerator_type is not None:
            raise fail("accelerator_type", "accelerator_type is a vLLM setting")
        if spec.tensor_parallel_size != 1:
            raise fail("tensor_parallel_size", "tensor_parallel_size is a vLLM setting")
    elif spec.accelerator_type is not None:
        _check_accelerator_type(spec.accelerator_type, fail)


def _check_num_gpus(spec: ModelSpec, fail: _Fail) -> None:
    value = spec.num_gpus
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise fail("num_gpus", "num_gpus must be a finite number of at least 0")
    if spec.engine == "vllm" and value != 0:
        # Ray Serve LLM reserves one GPU per tensor-parallel worker itself; a second request on
        # top would only make the adapter deployment wait for GPUs it never uses.
        raise fail(
            "num_gpus",
            "num_gpus is for cpu-engine models; a vLLM model takes one GPU per "
            "tensor_parallel_size worker (placed by Ray Serve LLM): leave num_gpus at 0",
        )


def _check_accelerator_type(value: str, fail: _Fail) -> None:
    # Ray's own list: its name becomes the `accelerator_type:<value>` resource that GPU nodes carry.
    from ray.util.accelerators import accelerators

    known = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    if value not in known:
        known_list = sorted(known)
        raise fail(
            "accelerator_type", f"accelerator_type {value!r} is not one of Ray's {known_list}"
        )


def check_deployable(spec: ModelSpec) -> None:
    """What a model added at run time needs of this cluster, beyond a well-formed spec: a cpu
    model's directory (absolute, with a config.json, seen from this node) and, for vLLM, the
    `cave[vllm]` extra. Raises ModelSpecError naming the field."""
    if spec.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ModelSpecError(
                spec.model_id,
                "engine",
                "engine 'vllm' needs the cave[vllm] extra (Ray Serve LLM and vLLM), which this "
                "cluster does not have: install it on every node, or use engine 'cpu'",
            )
        return
    path = Path(spec.source)
    try:
        found = path.is_absolute() and (path / "config.json").is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such directory either
        found = False
    if not found:
        raise ModelSpecError(
            spec.model_id,
            "source",
            f"source {spec.source!r} is not a model directory on this node: a cpu model's "
            "source is an absolute path to a directory with config.json (the "
            "from_pretrained layout), present on every node that may run it",
        )


def models_file(env: Mapping[str, str]) -> Path:
    """CAVE_MODELS_FILE, else the shipped config/models.toml."""
    return load_section(ModelsSettings, env).models_file


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


class RegisteredModels:
    """The models added through the admin API: rows of `registered_models`, one per model id,
    each holding its spec (every ModelSpec field but the id). Admin transactions only."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def all(self) -> dict[str, ModelSpec]:
        """Every stored spec by model id; a row that no longer makes a valid spec (written by
        another version) is logged and left out rather than failing the whole read."""
        async with self._db.read_session(None) as session:
            rows = (await session.scalars(select(RegisteredModelRow))).all()
        return {row.model_id: spec for row in rows if (spec := _valid_spec(row)) is not None}

    async def put(self, spec: ModelSpec, by: str) -> ModelSpec | None:
        """Store `spec` (insert or replace); returns the spec it replaced, None when new."""
        fields = _stored_fields(spec)
        async with self._db.admin_session() as session:
            row = await session.get(RegisteredModelRow, spec.model_id)
            if row is None:
                session.add(RegisteredModelRow(model_id=spec.model_id, spec=fields, updated_by=by))
                return None
            previous = _valid_spec(row)  # a row no longer valid is replaced as if new
            row.spec, row.updated_by = fields, by
        return previous

    async def delete(self, model_id: str) -> dict[str, Any] | None:
        """Remove the model's row; returns the fields it stored, None when there was none."""
        async with self._db.admin_session() as session:
            row = await session.get(RegisteredModelRow, model_id)
            if row is None:
                return None
            await session.execute(
                delete(RegisteredModelRow).where(RegisteredModelRow.model_id == model_id)
            )
        return dict(row.spec)

    async def restore(self, model_id: str, previous: ModelSpec | None, by: str) -> None:
        """Undo a `put` whose deployment failed: the spec it replaced, or no row at all."""
        if previous is None:
            await self.delete(model_id)
        else:
            await self.put(previous, by)


def _stored_fields(spec: ModelSpec) -> dict[str, Any]:
    fields = spec.to_dict()
    del fields["model_id"]  # the row's key
    return fields


def _valid_spec(row: RegisteredModelRow) -> ModelSpec | None:
    """The row's spec; None, logged, for a row that no longer makes one (another version of
    CAVE wrote it), so that one bad row does not stop the others from being served."""
    try:
        return ModelSpec.from_dict({**row.spec, "model_id": row.model_id})
    except ConfigError as exc:
        log.warning("registered model %r is ignored: %s", row.model_id, exc)
        return None
