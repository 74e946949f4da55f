"""Settings read from the environment: choices (value, default, a clear error) and secrets that
may come from files (NAME_FILE)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cave.env import MAX_SECRET_FILE_BYTES, env_secret
from cave.errors import ConfigError
from cluster.ingress import ingress_choice
from deployments.sandboxes.exec_records import load_mode


def test_a_choice_is_read_in_any_case_with_its_default() -> None:
    assert load_mode({"CAVE_EXEC_RECORDS": " Sync "}) == "sync"
    assert load_mode({}) == "async"
    assert ingress_choice({"CAVE_INGRESS": "SERVE"}) == "serve" and ingress_choice({}) == "haproxy"


@pytest.mark.parametrize(
    ("load", "name"), [(load_mode, "CAVE_EXEC_RECORDS"), (ingress_choice, "CAVE_INGRESS")]
)
def test_a_bad_choice_names_its_variable(load: object, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}='nope': expected one of"):
        load({name: "nope"})  # type: ignore[operator]


# --- secrets from files (NAME_FILE) ---------------------------------------------------------


def test_a_secret_is_read_from_its_file_without_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "pepper").write_text("c2VjcmV0\n")
    assert env_secret({"X_FILE": str(tmp_path / "pepper")}, "X") == "c2VjcmV0"
    assert env_secret({"X": "", "X_FILE": str(tmp_path / "pepper")}, "X") == "c2VjcmV0"
    assert env_secret({"X": "direct"}, "X") == "direct"
    assert env_secret({}, "X") is None and env_secret({"X": " ", "X_FILE": ""}, "X") is None


def test_a_secret_set_twice_is_refused_without_showing_it(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("from-file")
    with pytest.raises(ConfigError, match="X and X_FILE are both set") as caught:
        env_secret({"X": "from-env", "X_FILE": str(tmp_path / "s")}, "X")
    assert "from-env" not in str(caught.value) and "from-file" not in str(caught.value)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "missing", "cannot read it: No such file or directory"),
        (lambda d: d, "cannot read it: Is a directory"),
        (lambda d: _written(d / "empty", b"\n\n"), "the file is empty"),
        (lambda d: _written(d / "bin", b"\xff\xfe"), "not UTF-8 text"),
        (lambda d: _written(d / "big", b"k" * (MAX_SECRET_FILE_BYTES + 1)), "over 65536 bytes"),
    ],
)
def test_an_unusable_secret_file_names_the_variable_and_the_path(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        env_secret({"CAVE_KEY_PEPPER_FILE": str(path)}, "CAVE_KEY_PEPPER")
    assert str(caught.value) == f"CAVE_KEY_PEPPER_FILE={str(path)!r}: {problem}"


def test_an_endless_file_is_not_read_to_its_end() -> None:
    with pytest.raises(ConfigError, match="over 65536 bytes"):
        env_secret({"X_FILE": "/dev/zero"}, "X")


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
