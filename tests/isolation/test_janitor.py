"""The janitor removes what exited processes left, and nothing that is being set up."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

from actors.isolation import janitor
from actors.isolation.backend import select_backend
from config.settings import load_settings


def backend_at(state_dir: Path):  # type: ignore[no-untyped-def]
    settings = load_settings(env={"CAVE_ISOLATION_BACKEND": "none", "CAVE_STATE_DIR": "/tmp"})
    return replace(select_backend(settings.isolation), state_dir=state_dir, cgroups=None)


def test_sweep_removes_sandboxes_of_exited_owners_only(tmp_path: Path) -> None:
    root = tmp_path / "sandboxes"
    janitor.claim(root / "mine")  # owned by this (living) process
    gone = root / "orphan"
    gone.mkdir(parents=True)
    (gone / janitor.OWNER_FILE).write_text(str(_exited_pid()))

    assert janitor.sweep(backend_at(tmp_path)) == ["orphan"]
    assert (root / "mine").is_dir()
    assert not gone.exists()


def test_a_sandbox_being_claimed_is_not_taken_for_abandoned(tmp_path: Path) -> None:
    root = tmp_path / "sandboxes"
    (root / "claiming").mkdir(parents=True)  # mkdir done, owner not yet written
    stale = root / "stale"
    stale.mkdir()
    old = stale.stat().st_mtime - janitor.CLAIM_GRACE_S - 1
    os.utime(stale, (old, old))

    assert janitor.sweep(backend_at(tmp_path)) == ["stale"]
    assert (root / "claiming").is_dir()


def _exited_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
