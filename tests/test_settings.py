"""Tests of config.settings: TOML defaults, CAVE_* overrides, limit resolution and their errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from cave.errors import ConfigError, InvalidArgumentError, LimitExceededError
from config.settings import (
    DEFAULT_TOML_PATH,
    LimitOverrides,
    SandboxLimits,
    Settings,
    load_settings,
    parse_overrides,
    resolve_limits,
)

MIB = 1024 * 1024


@pytest.fixture
def settings() -> Settings:
    return load_settings(env={})


def test_defaults_come_from_the_shipped_toml(settings: Settings) -> None:
    assert settings.defaults == SandboxLimits(
        memory_mb=512, pids=128, cpu=1.0, disk_mb=1024, timeout_s=60, output_bytes=1048576
    )
    assert settings.maximum.memory_mb == 8192
    assert settings.maximum.timeout_s == 86400
    assert settings.isolation.backend == "auto"
    assert settings.isolation.bwrap_path is None
    assert settings.isolation.rootfs is None
    assert settings.isolation.state_dir == Path("/run/cave")
    assert settings.isolation.no_fallback is False
    assert settings.pool.size_per_node == 2


def test_byte_properties_are_mebibytes(settings: Settings) -> None:
    assert settings.defaults.memory_bytes == 512 * MIB
    assert settings.defaults.disk_bytes == 1024 * MIB


def test_settings_are_frozen(settings: Settings) -> None:
    with pytest.raises(ValueError, match="frozen"):
        settings.defaults.memory_mb = 1  # type: ignore[misc]


def test_toml_is_shipped_next_to_the_module() -> None:
    assert DEFAULT_TOML_PATH.name == "sandbox_config.toml"
    assert DEFAULT_TOML_PATH.is_file()


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("CAVE_DEFAULT_MEMORY_MB", "256", "memory_mb", 256),
        ("CAVE_DEFAULT_PIDS", "64", "pids", 64),
        ("CAVE_DEFAULT_CPU", "0.5", "cpu", 0.5),
        ("CAVE_DEFAULT_DISK_MB", "2048", "disk_mb", 2048),
        ("CAVE_DEFAULT_TIMEOUT_S", "2.5", "timeout_s", 2.5),
        ("CAVE_DEFAULT_OUTPUT_BYTES", "4096", "output_bytes", 4096),
    ],
)
def test_each_default_is_overridden_by_its_variable(
    variable: str, raw: str, field: str, expected: float
) -> None:
    settings = load_settings(env={variable: raw})
    assert getattr(settings.defaults, field) == expected
    untouched = load_settings(env={})
    assert settings.maximum == untouched.maximum


def test_maxima_and_other_sections_are_overridden() -> None:
    settings = load_settings(
        env={
            "CAVE_MAX_MEMORY_MB": "16384",
            "CAVE_ISOLATION_BACKEND": "BWRAP",
            "CAVE_BWRAP_PATH": "/opt/bwrap",
            "CAVE_CGROUP_ROOT": "cave/test",
            "CAVE_ISOLATION_NO_FALLBACK": "Yes",
            "CAVE_STATE_DIR": "/tmp/cave-state",
            "CAVE_ROOTFS": "/srv/rootfs",
            "CAVE_SANDBOX_UID": "200000",
            "CAVE_POOL_SIZE": "0",
        }
    )
    assert settings.maximum.memory_mb == 16384
    assert settings.isolation.backend == "bwrap"
    assert settings.isolation.bwrap_path == "/opt/bwrap"
    assert settings.isolation.cgroup_root == "cave/test"
    assert settings.isolation.no_fallback is True
    assert settings.isolation.state_dir == Path("/tmp/cave-state")
    assert settings.isolation.rootfs == Path("/srv/rootfs")
    assert settings.isolation.sandbox_uid == 200000
    assert settings.pool.size_per_node == 0


@pytest.mark.parametrize(("raw", "expected"), [("0", False), ("FALSE", False), ("no", False)])
def test_no_fallback_accepts_false_words(raw: str, expected: bool) -> None:
    env = {"CAVE_ISOLATION_NO_FALLBACK": raw}
    assert load_settings(env=env).isolation.no_fallback is expected


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("CAVE_DEFAULT_MEMORY_MB", "abc", "expected a positive integer"),
        ("CAVE_DEFAULT_MEMORY_MB", "0", "expected a positive integer"),
        ("CAVE_DEFAULT_PIDS", "1.5", "expected a positive integer"),
        ("CAVE_DEFAULT_CPU", "-1", "expected a positive number"),
        ("CAVE_DEFAULT_TIMEOUT_S", "nan", "expected a positive number"),
        ("CAVE_MAX_OUTPUT_BYTES", "", "expected a positive integer"),
        ("CAVE_ISOLATION_BACKEND", "docker", "expected one of auto, builtin, bwrap, none"),
        ("CAVE_ISOLATION_NO_FALLBACK", "maybe", "expected true/false"),
        ("CAVE_POOL_SIZE", "-1", "expected a non-negative integer"),
        ("CAVE_SANDBOX_UID", "0", "expected a positive integer"),
        ("CAVE_CGROUP_ROOT", "../escape", "relative cgroup path"),
        ("CAVE_CGROUP_ROOT", "/sys/fs/cgroup", "relative cgroup path"),
        ("CAVE_STATE_DIR", "relative/dir", "absolute path"),
        ("CAVE_ROOTFS", "rootfs", "absolute path"),
    ],
)
def test_malformed_variable_is_named_with_its_value(variable: str, raw: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={variable: raw})
    message = str(caught.value)
    assert message.startswith(f"{variable}={raw!r}: ")
    assert expected in message


def test_default_above_maximum_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CAVE_DEFAULT_MEMORY_MB") as caught:
        load_settings(env={"CAVE_DEFAULT_MEMORY_MB": "9000"})
    assert "9000" in str(caught.value)
    assert "8192" in str(caught.value)


def test_maximum_below_default_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CAVE_MAX_CPU"):
        load_settings(env={"CAVE_MAX_CPU": "0.5"})


def test_config_error_pickles() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"CAVE_DEFAULT_PIDS": "x"})
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[defaults\nmemory_mb = ")
    with pytest.raises(ConfigError, match="malformed TOML") as caught:
        load_settings(env={}, toml_path=path)
    assert str(path) in str(caught.value)


def test_missing_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="absent.toml"):
        load_settings(env={}, toml_path=path)


def test_bad_toml_value_names_file_and_key(tmp_path: Path) -> None:
    text = DEFAULT_TOML_PATH.read_text().replace("pids = 128", "pids = -3")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, toml_path=path)
    assert str(caught.value).startswith(f"{path}: defaults.pids=-3: ")


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    text = DEFAULT_TOML_PATH.read_text().replace("pids = 128", "pids = 128\nmemroy_mb = 1")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="defaults.memroy_mb"):
        load_settings(env={}, toml_path=path)


def test_environment_wins_over_a_bad_toml_value(tmp_path: Path) -> None:
    text = DEFAULT_TOML_PATH.read_text().replace("pids = 128", "pids = -3")
    path = _write(tmp_path, text)
    settings = load_settings(env={"CAVE_DEFAULT_PIDS": "7"}, toml_path=path)
    assert settings.defaults.pids == 7


def test_no_overrides_gives_the_defaults(settings: Settings) -> None:
    assert resolve_limits(None, settings) == settings.defaults
    assert resolve_limits(LimitOverrides(), settings) == settings.defaults


def test_override_can_lower_a_limit(settings: Settings) -> None:
    limits = resolve_limits(parse_overrides(memory_mb=128, timeout_s=5), settings)
    assert limits.memory_mb == 128
    assert limits.timeout_s == 5
    assert limits.pids == settings.defaults.pids


def test_override_can_raise_a_limit_up_to_the_maximum(settings: Settings) -> None:
    limits = resolve_limits(parse_overrides(memory_mb=8192, cpu=2), settings)
    assert limits.memory_mb == 8192
    assert limits.cpu == 2.0


def test_override_above_maximum_names_field_value_and_maximum(settings: Settings) -> None:
    with pytest.raises(LimitExceededError) as caught:
        resolve_limits(parse_overrides(memory_mb=8193), settings)
    message = str(caught.value)
    assert "memory_mb" in message
    assert "8193" in message
    assert "8192" in message


def test_limit_exceeded_is_an_invalid_argument(settings: Settings) -> None:
    with pytest.raises(InvalidArgumentError):
        resolve_limits(parse_overrides(pids=10**6), settings)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"memory_mb": -5}, "memory_mb must be > 0, got -5"),
        ({"cpu": 0}, "cpu must be > 0, got 0"),
        ({"pids": "many"}, "pids: "),
        ({"timeout_s": float("inf")}, "timeout_s: "),
        ({"memroy_mb": 1}, "memroy_mb is not a sandbox limit"),
    ],
)
def test_bad_override_is_an_invalid_argument(values: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_overrides(**values)
    assert expected in str(caught.value)


def test_production_is_read_from_cave_env() -> None:
    assert load_settings(env={}).isolation.production is False
    assert load_settings(env={"CAVE_ENV": "development"}).isolation.production is False
    assert load_settings(env={"CAVE_ENV": " Production "}).isolation.production is True


def test_production_refuses_the_none_backend_at_load() -> None:
    with pytest.raises(ConfigError, match="CAVE_ISOLATION_BACKEND='none'.*CAVE_ENV=production"):
        load_settings(env={"CAVE_ENV": "production", "CAVE_ISOLATION_BACKEND": "none"})
    assert load_settings(env={"CAVE_ISOLATION_BACKEND": "none"}).isolation.backend == "none"
