"""The model registry: models.toml and CAVE_MODELS_FILE, what a malformed entry says, GPUs for
cpu-engine models, and the table of models added through the admin API (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pickle
from pathlib import Path

import pytest
from sqlalchemy import select

from cave.db import Database
from cave.db.models import RegisteredModelRow
from cave.errors import ConfigError, NotFoundError
from config.api import DEFAULT_MODELS_FILE
from deployments.llm.engine import engine_deployment, engine_options, model_app_name
from inference.cpu_engine import pick_device
from inference.registry import (
    ModelRegistry,
    ModelSpec,
    ModelSpecError,
    RegisteredModels,
    check_deployable,
    load_models,
)
from tests.db.conftest import Target

MODELS = """
[[models]]
model_id = "tiny-chat"
engine = "cpu"
source = "models/tiny"

[[models]]
model_id = "qwen2.5-7b-instruct"
engine = "vllm"
source = "Qwen/Qwen2.5-7B-Instruct"
accelerator_type = "L4"
tensor_parallel_size = 2
max_model_len = 8192
min_replicas = 0
max_replicas = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_the_shipped_file_lists_no_models() -> None:
    assert DEFAULT_MODELS_FILE.is_file()
    assert ModelRegistry.from_env({}).ids() == []


def test_models_file_names_the_file_and_its_models(tmp_path: Path) -> None:
    path = write(tmp_path, MODELS)
    registry = ModelRegistry.from_env({"CAVE_MODELS_FILE": str(path)})

    assert registry.ids() == ["qwen2.5-7b-instruct", "tiny-chat"]
    # A relative CPU model directory is read from the file's directory.
    assert registry.get("tiny-chat").source == str(tmp_path / "models" / "tiny")
    qwen = registry.get("qwen2.5-7b-instruct")
    assert qwen == ModelSpec(
        model_id="qwen2.5-7b-instruct",
        engine="vllm",
        source="Qwen/Qwen2.5-7B-Instruct",
        accelerator_type="L4",
        tensor_parallel_size=2,
        max_model_len=8192,
        min_replicas=0,
        max_replicas=3,
    )
    assert ModelSpec.from_dict(qwen.to_dict()) == qwen
    with pytest.raises(NotFoundError, match="no-such-model"):
        registry.get("no-such-model")


def test_a_spec_dict_may_say_path_for_source() -> None:
    spec = ModelSpec.from_dict({"model_id": "m", "engine": "cpu", "path": "/srv/m"})
    assert spec.source == "/srv/m" and spec.min_replicas == 1 and spec.max_replicas == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('model_id = "m"\nengine = "tpu"\nsource = "x"', "engine must be one of"),
        ('model_id = "m"\nengine = "cpu"\nsource = "x"\ngpus = 1', "unknown keys"),
        ('model_id = "m"\nengine = "cpu"', "source"),
        ('model_id = "a b"\nengine = "cpu"\nsource = "x"', "model_id must match"),
        ('model_id = "m"\nengine = "vllm"\nsource = "x"\naccelerator_type = "X1"', "X1"),
        ('model_id = "m"\nengine = "cpu"\nsource = "x"\naccelerator_type = "L4"', "vLLM"),
        ('model_id = "m"\nengine = "vllm"\nsource = "x"\ntensor_parallel_size = 0', "tensor"),
        ('model_id = "m"\nengine = "vllm"\nsource = "x"\nmin_replicas = 3', "min_replicas"),
        ('model_id = "m"\nengine = "vllm"\nsource = "x"\nmax_model_len = "8k"', "max_model"),
    ],
)
def test_a_malformed_model_names_the_file_and_the_fault(
    tmp_path: Path, entry: str, message: str
) -> None:
    path = write(tmp_path, f"[[models]]\n{entry}\n")
    with pytest.raises(ConfigError, match=message) as caught:
        load_models(path)
    assert str(path) in str(caught.value)


def test_unreadable_files_and_duplicates_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CAVE_MODELS_FILE"):
        load_models(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="CAVE_MODELS_FILE"):
        load_models(write(tmp_path, "[[models]\n"))
    with pytest.raises(ConfigError, match="tables"):
        load_models(write(tmp_path, 'models = "none"\n'))
    twice = ModelSpec("m", "cpu", "/srv/m")
    with pytest.raises(ConfigError, match="twice"):
        ModelRegistry([twice, twice])


# --- GPUs for cpu-engine models -----------------------------------------------------------------


def test_num_gpus_defaults_to_zero_and_takes_fractions() -> None:
    assert ModelSpec("m", "cpu", "/srv/m").num_gpus == 0.0
    assert ModelSpec("m", "cpu", "/srv/m", num_gpus=0.5).num_gpus == 0.5
    whole = ModelSpec.from_dict(
        {"model_id": "m", "engine": "cpu", "source": "/srv/m", "num_gpus": 1}
    )
    assert whole.num_gpus == 1.0 and isinstance(whole.num_gpus, float)
    assert ModelSpec.from_dict(whole.to_dict()) == whole


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, "1", True, None])
def test_num_gpus_must_be_a_finite_number_of_at_least_zero(value: object) -> None:
    with pytest.raises(ModelSpecError, match="num_gpus must be a finite number") as caught:
        ModelSpec("m", "cpu", "/srv/m", num_gpus=value)  # type: ignore[arg-type]
    assert caught.value.field == "num_gpus"


def test_a_vllm_model_takes_its_gpus_from_tensor_parallel_size() -> None:
    with pytest.raises(ModelSpecError, match="tensor_parallel_size") as caught:
        ModelSpec("m", "vllm", "Qwen/Qwen2.5-7B-Instruct", num_gpus=1)
    assert caught.value.field == "num_gpus"
    assert ModelSpec("m", "vllm", "Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2).num_gpus == 0


def test_num_gpus_in_the_models_file(tmp_path: Path) -> None:
    entry = 'model_id = "m"\nengine = "cpu"\nsource = "m"\nnum_gpus = 2\n'
    [spec] = load_models(write(tmp_path, f"[[models]]\n{entry}"))
    assert spec.num_gpus == 2.0
    with pytest.raises(ConfigError, match="num_gpus") as caught:
        load_models(write(tmp_path, f"[[models]]\n{entry.replace('2', '-2')}"))
    assert str(tmp_path) in str(caught.value)


def test_a_spec_error_names_its_field_and_pickles() -> None:
    with pytest.raises(ModelSpecError) as caught:
        ModelSpec("m", "cpu", "/srv/m", min_replicas=3)
    error = caught.value
    assert (error.field, error.reason) == ("min_replicas", "min_replicas is above max_replicas")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.field, str(copy)) == (ModelSpecError, "min_replicas", str(error))


def test_the_engine_deployment_asks_ray_for_the_gpus() -> None:
    gpu = ModelSpec("tiny", "cpu", "/srv/tiny", num_gpus=0.5, min_replicas=0, max_replicas=2)

    options = engine_options(gpu)
    assert options["name"] == "ModelEngine:tiny"
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 2}
    deployment = engine_deployment(gpu)
    assert deployment.name == "ModelEngine:tiny"
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0.5}


def test_without_gpus_the_engine_deployment_asks_for_none() -> None:
    cpu = engine_options(ModelSpec("tiny", "cpu", "/srv/tiny"))
    vllm = engine_options(ModelSpec("qwen", "vllm", "Qwen/Qwen2.5-7B-Instruct"))

    assert cpu["ray_actor_options"] == {"num_cpus": 1} and cpu["num_replicas"] == 1
    # The vLLM adapter only relays: the GPUs are its LLMServer's, placed by Ray Serve LLM.
    assert vllm["ray_actor_options"] == {"num_cpus": 0}
    # A GPU model's options never leak into the next model's (the defaults are shared).
    engine_options(ModelSpec("g", "cpu", "/srv/g", num_gpus=1))
    assert engine_options(ModelSpec("c", "cpu", "/srv/c"))["ray_actor_options"] == {"num_cpus": 1}


def test_the_engine_runs_on_cuda_only_when_given_gpus_and_torch_sees_one() -> None:
    import torch

    assert pick_device(False) == "cpu"
    assert pick_device(True) == ("cuda" if torch.cuda.is_available() else "cpu")


# --- Models added at run time -------------------------------------------------------------------


def test_each_model_gets_its_own_serve_app_name() -> None:
    assert model_app_name("tiny-chat_2.5") == "cave-model-tiny-chat_2.5"
    slash, colon = model_app_name("org/model"), model_app_name("org:model")
    assert slash.startswith("cave-model-org-model-") and colon.startswith("cave-model-org-model-")
    assert slash != colon != model_app_name("org-model")


def test_a_deployable_cpu_model_is_an_absolute_model_directory(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    check_deployable(ModelSpec("m", "cpu", str(tiny_model_dir)))
    for source in [str(tmp_path / "absent"), str(tmp_path), "relative/dir", "/srv/\x00"]:
        with pytest.raises(ModelSpecError, match="not a model directory") as caught:
            check_deployable(ModelSpec("m", "cpu", source))
        assert caught.value.field == "source"


def test_a_vllm_model_needs_the_vllm_extra() -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ModelSpecError, match=r"cave\[vllm\]") as caught:
        check_deployable(ModelSpec("m", "vllm", "Qwen/Qwen2.5-7B-Instruct"))
    assert caught.value.field == "engine"


@pytest.fixture
async def store(db: Database, target: Target) -> RegisteredModels:
    await target.raw("DELETE FROM registered_models")  # not among the tables tests/db empties
    return RegisteredModels(db)


@pytest.mark.anyio
async def test_the_table_stores_replaces_and_deletes_specs(store: RegisteredModels) -> None:
    first = ModelSpec("org/tiny", "cpu", "/srv/tiny", num_gpus=0.25)
    second = dataclasses.replace(first, max_replicas=3)

    assert await store.put(first, "admin-key") is None
    assert await store.all() == {"org/tiny": first}
    assert await store.put(second, "admin-key") == first
    assert await store.all() == {"org/tiny": second}
    await store.restore("org/tiny", first, "admin-key")  # a failed replace is undone
    assert await store.all() == {"org/tiny": first}
    stored = await store.delete("org/tiny")  # the fields it held, for the audit trail
    assert stored == {k: v for k, v in first.to_dict().items() if k != "model_id"}
    assert await store.delete("org/tiny") is None
    assert await store.all() == {}


@pytest.mark.anyio
async def test_a_row_that_is_no_longer_a_valid_spec_is_left_out(
    store: RegisteredModels, target: Target
) -> None:
    await store.put(ModelSpec("good", "cpu", "/srv/good"), "admin-key")
    await store.put(ModelSpec("bad", "cpu", "/srv/bad"), "admin-key")
    await target.raw(
        "UPDATE registered_models SET spec = $1 WHERE model_id = 'bad'",
        '{"engine": "tpu", "source": "/srv/bad"}',
    )
    assert list(await store.all()) == ["good"]
    # It can still be replaced (as if new) and deleted.
    assert await store.put(ModelSpec("bad", "cpu", "/srv/fixed"), "admin-key") is None
    assert (await store.delete("bad") or {})["source"] == "/srv/fixed"


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["postgresql"])  # row-level security is PostgreSQL's
async def test_only_admin_transactions_see_the_table(
    store: RegisteredModels, db: Database, backend: str
) -> None:
    await store.put(ModelSpec("m", "cpu", "/srv/m"), "admin-key")
    async with db.namespace_session("some-team") as session:
        assert (await session.scalars(select(RegisteredModelRow))).all() == []
