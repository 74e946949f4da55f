"""Import arrows between CAVE's folders, this tree next to a baseline commit (default: the one
before issue 12): how many folder-to-folder arrows, how many point against the layers, cycles.

`python -m bench.layers [REV]`. A folder is a top-level package or one of its sub-packages
(cave/cli, deployments/http, ...); an arrow is "some module of folder A imports folder B". The
layers: cave, config (0) <- actors, inference (1) <- deployments (2) <- cluster (3); config may
import cave. Not a timing: the figure of issue 12 is a count (tests/test_layers.py asserts 0).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "af08401^"  # the tree before issue 12's first step (the CLI still in cave/cli)
LEVELS = {"cave": 0, "config": 0, "actors": 1, "inference": 1, "deployments": 2, "cluster": 3}
SAME_LEVEL = {("config", "cave")}


def _folder(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def _targets(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module


def _target_folder(module: str, root: Path) -> str | None:
    parts = module.split(".")
    if parts[0] not in LEVELS:
        return None
    if len(parts) > 1 and (root / parts[0] / parts[1]).is_dir():
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


def arrows(root: Path) -> set[tuple[str, str]]:
    found = set()
    for package in LEVELS:
        for path in (root / package).rglob("*.py"):
            source = _folder(path, root)
            for module in _targets(path):
                target = _target_folder(module, root)
                if target is not None and target != source:
                    found.add((source, target))
    return found


def against(arrow: tuple[str, str]) -> bool:
    source, dest = (side.split("/")[0] for side in arrow)
    return source != dest and LEVELS[dest] >= LEVELS[source] and (source, dest) not in SAME_LEVEL


def cycles(found: set[tuple[str, str]]) -> int:
    """Pairs of top-level packages that import each other, directly or through others."""
    graph: dict[str, set[str]] = {p: set() for p in LEVELS}
    for source, dest in found:
        a, b = source.split("/")[0], dest.split("/")[0]
        if a != b:
            graph[a].add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    return sum(1 for a in LEVELS for b in graph[a] if a < b and reaches(b, a))


def _checkout(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def report(name: str, root: Path) -> None:
    found = arrows(root)
    wrong = sorted(a for a in found if against(a))
    print(
        f"{name:28s} arrows {len(found):3d}  against the layers {len(wrong):2d}  "
        f"cycles {cycles(found)}"
    )
    for source, dest in wrong:
        print(f"    {source} -> {dest}")


def main(argv: list[str]) -> None:
    rev = argv[0] if argv else BASELINE
    with tempfile.TemporaryDirectory() as tmp:
        report(f"baseline ({rev})", _checkout(rev, Path(tmp)))
    report("this tree", ROOT)


if __name__ == "__main__":
    main(sys.argv[1:])
