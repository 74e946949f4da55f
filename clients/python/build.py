"""Build the client distribution (sdist and wheel) into dist/: `python clients/python/build.py`.

Its sources live in the repository's `cave/` beside the server's, so they are staged with this
directory's pyproject in a temporary directory, whose sdist is then whole on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = ("cave/__init__.py", "cave/errors.py", "cave/client")  # what the client owns
REPO_ONLY = ('path = "../../cave/__init__.py"', "dev-mode-dirs")  # lines for the repo's layout


def stage(into: Path) -> None:
    for name in SOURCES:
        source, target = ROOT / name, into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    shutil.copy2(HERE / "README.md", into / "README.md")
    shutil.copy2(ROOT / "LICENSE", into / "LICENSE")
    text = (HERE / "pyproject.toml").read_text()
    text = text.replace(REPO_ONLY[0], 'path = "cave/__init__.py"')
    lines = [line for line in text.splitlines() if not line.startswith(REPO_ONLY[1])]
    (into / "pyproject.toml").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    outdir = Path(argv[0]).resolve() if argv else ROOT / "dist"
    with tempfile.TemporaryDirectory(prefix="cave-client-build-") as tmp:
        stage(Path(tmp))
        build = [sys.executable, "-m", "build", "--outdir", str(outdir), tmp]
        return subprocess.run(build).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
