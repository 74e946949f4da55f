"""The model registry: models.toml and CAVE_MODELS_FILE, and what a malformed entry says."""

from __future__ import annotations

from pathlib import Path

import pytest

from cave.errors import ConfigError, NotFoundError
from inference.registry import DEFAULT_MODELS_FILE, ModelRegistry, ModelSpec, load_models

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
