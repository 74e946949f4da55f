"""docs/configuration.md is generated from the tree of settings and current, and every environment
variable the code names is declared in that tree and documented."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.docs import BEGIN, DOC, END, render, update
from config.tree import variables

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cave", "actors", "inference", "deployments", "cluster", "config")
NAME = re.compile(r"^(CAVE|BKG)_[A-Z0-9_]+$")


def _names_in_code() -> Iterator[tuple[str, str, bool]]:
    """(name, where, is a prefix) for each variable named in our packages' code."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield from _names_in(path.read_text(), str(path.relative_to(ROOT)))


def _names_in(source: str, where: str) -> Iterator[tuple[str, str, bool]]:
    """Each string literal that is a variable's name, and each head of an f-string that builds
    one (`f"CAVE_DEFAULT_{key}"`); a name ending in `_` is a family's prefix."""
    tree = ast.parse(source, where)
    in_fstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            in_fstrings.update(id(part) for part in node.values)
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and NAME.match(str(head.value)):
                yield head.value, f"{where}:{node.lineno}", True
    literals = (
        n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in in_fstrings
    )
    for node in literals:
        if isinstance(node.value, str) and NAME.match(node.value):
            yield node.value, f"{where}:{node.lineno}", node.value.endswith("_")


def test_the_reference_in_the_docs_is_current() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text
    assert update(text) == text, (
        "docs/configuration.md is stale: run `make config-docs` (python -m config.docs)"
    )


def test_the_scan_finds_names_and_families() -> None:
    source = 'env.get("BKG_DB_PATH")\nf"CAVE_MAX_{key.upper()}"\nf"{name}_FILE"\n"CAVE_X_"\n"CAVE"'
    found = {(name, prefix) for name, _, prefix in _names_in(source, "x.py")}
    assert found == {("BKG_DB_PATH", False), ("CAVE_MAX_", True), ("CAVE_X_", True)}
    assert ("BKG_DB_DSN", False) in {(name, prefix) for name, _, prefix in _names_in_code()}


def test_every_variable_the_code_names_is_declared_and_documented() -> None:
    declared = variables()
    documented = set(re.findall(r"`((?:CAVE|BKG)_[A-Z0-9_]+)`", DOC.read_text()))
    missing, undocumented = [], []
    for name, where, prefix in _names_in_code():
        known = any(v.startswith(name) for v in declared) if prefix else name in declared
        if not known:
            missing.append(f"{name}{'*' if prefix else ''} ({where})")
        elif not prefix and name not in documented:
            undocumented.append(f"{name} ({where})")
    assert not missing, (
        "variables read by the code but declared by no settings field (add an env_field to a "
        "section of config/tree.py, then run `make config-docs`): " + ", ".join(missing)
    )
    assert not undocumented, "not in docs/configuration.md (run `make config-docs`): " + ", ".join(
        undocumented
    )


def test_every_declared_variable_is_documented_once_and_named_once() -> None:
    reference = render()
    for name in variables():
        assert f"`{name}`" in reference, f"{name} is declared but not in the reference"
    rows = re.findall(r"^\| `((?:CAVE|BKG)_[A-Z0-9_]+)`", reference, re.MULTILINE)
    assert sorted(rows) == sorted(set(rows)), "a variable is declared by two fields"


@pytest.mark.parametrize("client", ["CAVE_API_URL", "CAVE_API_KEY"])
def test_the_client_variables_are_documented(client: str) -> None:
    assert client in variables() and f"`{client}`" in DOC.read_text()


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("CAVE_LLM_RPM", "lots"),
        ("CAVE_UPKEEP_INTERVAL_S", "-1"),
        ("CAVE_DEFAULT_MEMORY_MB", "abc"),
        ("CAVE_EXEC_RECORDS", "sometimes"),
        ("CAVE_AUDIT_LOG_MAX_BYTES", "0"),
    ],
)
def test_the_whole_tree_loads_in_one_call_and_a_bad_value_anywhere_names_itself(
    tmp_path: Path, name: str, bad: str
) -> None:
    from cave.errors import ConfigError
    from config.tree import load_cave_settings

    env = {"CAVE_SECRETS_DIR": str(tmp_path / "secrets"), "BKG_DB_PATH": str(tmp_path / "db")}
    tree = load_cave_settings(env)
    assert (tree.llm.rpm, tree.database.path, tree.exec_records.mode) == (
        600,
        tmp_path / "db",
        "async",
    )
    with pytest.raises(ConfigError, match=name):
        load_cave_settings({**env, name: bad})
