"""The product as a user installs it: wheels built by `python -m build`, each in a fresh venv.

The server's wheel runs `cave up` and `cave sandbox run` from a directory outside the checkout
(every data file it needs is package data); the client's wheel, alone in its venv (no Ray, no
torch), drives a sandbox of that server over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

import cave

ROOT = Path(__file__).resolve().parents[2]
SERVER, CLIENT = "cave_sandbox", "cave_sandbox_client"
CLIENT_FILES = {"cave/__init__.py", "cave/errors.py"}  # and cave/client/*
SERVER_DATA = {
    "config/serve.yaml",
    "config/models.toml",
    "config/sandbox_config.toml",
    "cave/db/migrations/script.py.mako",
    "actors/isolation/native/cave-exec.c",
}
CLIENT_SCRIPT = """
import sys
from cave.client import Cave
with Cave(sys.argv[1], sys.argv[2]) as client:
    with client.sandboxes.create(name="from-the-client-wheel") as sandbox:
        result = sandbox.exec(["python3", "-c", "print(6 * 7)"])
        print(result.stdout.strip(), result.exit_code)
"""


@dataclass
class Built:
    server: Path
    client: Path


@dataclass
class Installed:
    venv: Path
    env: dict[str, str]
    cwd: Path

    def cave(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "cave"), *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


def _run(*argv: str | Path, timeout_s: float = 600, **kwargs: object) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout_s, **kwargs
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _fresh_venv(path: Path, *wheels: Path) -> Path:
    _run(sys.executable, "-m", "venv", path)
    _run(path / "bin" / "pip", "install", "--disable-pip-version-check", *wheels)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)  # sdist, then the wheel from it
    _run(sys.executable, ROOT / "clients" / "python" / "build.py", out)
    server, client = (next(out.glob(f"{name}-*.whl")) for name in (SERVER, CLIENT))
    return Built(server, client)


@pytest.fixture(scope="module")
def server(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The server's wheel in a fresh venv, `cave up` run from a directory under /tmp."""
    venv = _fresh_venv(tmp_path_factory.mktemp("server-venv"), built.client, built.server)
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CAVE_", "BKG_"))}
    env.pop("PYTHONPATH", None)
    env.update(
        CAVE_HOME=str(home),
        CAVE_STATE_DIR=f"/run/cave-wheel-test-{os.getpid()}",
        PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    installed = Installed(venv, env, tmp_path_factory.mktemp("elsewhere"))
    up = installed.cave("up", "--num-cpus", "2", timeout_s=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield installed
    finally:
        installed.cave("down")


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(meta).decode())
    return [r for r in headers.get_all("Requires-Dist") or [] if "extra ==" not in r]


def test_the_client_wheel_holds_the_client_and_needs_only_httpx_and_pydantic(built: Built) -> None:
    files = _wheel_files(built.client)
    client_dir = {str(p.relative_to(ROOT)) for p in (ROOT / "cave" / "client").iterdir()}
    assert files == CLIENT_FILES | {f for f in client_dir if not f.endswith("__pycache__")}
    assert sorted(r.split(">")[0] for r in _requirements(built.client)) == ["httpx", "pydantic"]


def test_the_server_wheel_ships_its_data_and_leaves_the_client_to_its_distribution(
    built: Built,
) -> None:
    files = _wheel_files(built.server)
    assert files >= SERVER_DATA
    assert not files & CLIENT_FILES and not any(f.startswith("cave/client/") for f in files)
    assert not any(f.startswith(("tests/", "bench/")) for f in files)
    assert f"cave-sandbox-client=={cave.__version__}" in _requirements(built.server)


def test_both_distributions_carry_the_release_and_the_licence(built: Built) -> None:
    for wheel in (built.server, built.client):
        assert wheel.name.split("-")[1] == cave.__version__
        with zipfile.ZipFile(wheel) as archive:
            licence = next(n for n in archive.namelist() if n.endswith("licenses/LICENSE"))
            assert b"Apache License" in archive.read(licence)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"


def test_the_installed_server_runs_a_sandbox_from_outside_the_checkout(server: Installed) -> None:
    assert not (server.cwd / "config").exists()
    version = server.cave("--version")
    assert version.stdout == f"cave {cave.__version__}\n"
    done = server.cave("sandbox", "run", "--", "python3", "-c", "print(1)")
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    listed = server.cave("sandbox", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    probe = "import cluster; print(cluster.__file__)"
    where = _run(server.venv / "bin" / "python", "-c", probe, cwd=server.cwd, env=server.env)
    assert where.startswith(str(server.venv)), "the venv's copy ran, not the checkout"


def test_the_client_wheel_alone_drives_a_sandbox_without_ray(
    built: Built, server: Installed, tmp_path: Path
) -> None:
    venv = _fresh_venv(tmp_path / "client-venv", built.client)
    python = venv / "bin" / "python"
    installed = _run(venv / "bin" / "pip", "list", "--format=json", "--disable-pip-version-check")
    names = {p["name"].lower() for p in json.loads(installed)}
    assert not names & {"ray", "torch", "pyseccomp", "cave-sandbox"}
    api = json.loads((Path(server.env["CAVE_HOME"]) / "api.json").read_text())
    output = _run(python, "-c", CLIENT_SCRIPT, api["url"], api["admin_key"], cwd=tmp_path)
    assert output == "42 0\n"
