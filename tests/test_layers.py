"""The import arrows between our packages point one way: down the layers, never up, never round.

cave and config (0) <- actors, inference (1) <- deployments (2) <- cluster (3). Inside deployments,
`http` may import the two other wings; `sandboxes` and `llm` import neither it nor each other,
and the modules beside them (`schemas`, `spans`) import no wing. Every import counts, those
inside functions (imported lazily) and under TYPE_CHECKING included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {"cave": 0, "config": 0, "actors": 1, "inference": 1, "deployments": 2, "cluster": 3}
# Imports between packages of one level: config reads cave's environment parsing and errors.
SAME_LEVEL = {("config", "cave")}
# deployments' sub-packages and what each may import of deployments besides itself.
WINGS = {"http": {"sandboxes", "llm", ""}, "sandboxes": {""}, "llm": {""}, "": set()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            # `from deployments import quotas`: the names may be modules, so they count too.
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def _edges() -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) for every import of one of our packages."""
    found = []
    for package in LEVELS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, target in _imports(path):
                if target.split(".")[0] in LEVELS:
                    found.append((_module_name(path), line, target))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def _against_layers(module: str, target: str) -> bool:
    source, dest = _top(module), _top(target)
    return source != dest and LEVELS[dest] >= LEVELS[source] and (source, dest) not in SAME_LEVEL


def test_no_package_imports_one_above_it_or_beside_it() -> None:
    wrong = [
        f"{module}:{line} imports {target}"
        for module, line, target in _edges()
        if _against_layers(module, target)
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(set(wrong)))


def test_the_top_level_packages_import_each_other_in_no_cycle() -> None:
    graph: dict[str, set[str]] = {package: set() for package in LEVELS}
    for module, _, target in _edges():
        if _top(module) != _top(target):
            graph[_top(module)].add(_top(target))
    for start in graph:
        path = _cycle_from(graph, start, [start])
        assert path is None, "a cycle of imports: " + " -> ".join(path or [])


def _cycle_from(graph: dict[str, set[str]], node: str, path: list[str]) -> list[str] | None:
    for successor in sorted(graph[node]):
        if successor == path[0]:
            return [*path, successor]
        if successor not in path:
            found = _cycle_from(graph, successor, [*path, successor])
            if found is not None:
                return found
    return None


def _wing(module: str) -> str | None:
    """The wing of a deployments module ("" for the modules beside the wings); None outside."""
    parts = module.split(".")
    if parts[0] != "deployments" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in WINGS else ""


def test_the_wings_of_deployments_import_only_downwards() -> None:
    wrong = []
    for module, line, target in _edges():
        source, dest = _wing(module), _wing(target)
        if source is None or dest is None or source == dest:
            continue
        if dest not in WINGS[source]:
            wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports between deployments' wings:\n" + "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("inference.gateway", "deployments.sandboxes.exec_records", False),
        ("cave.errors", "config.settings", False),
        ("config.settings", "cave.errors", True),
        ("actors.remote", "inference.peers", False),
        ("cluster.api", "deployments.http.app", True),
    ],
)
def test_the_layer_rule_itself(module: str, target: str, allowed: bool) -> None:
    """The rule the first test applies, on imports that would (not) break it."""
    assert _against_layers(module, target) is not allowed
