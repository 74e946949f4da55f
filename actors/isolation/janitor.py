"""Removes what sandboxes of dead host processes left behind (cgroups, directories) on this node."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from actors.isolation.backend import Backend

log = logging.getLogger("cave.janitor")
OWNER_FILE = "owner"
CLAIM_GRACE_S = 60.0


def claim(sandbox_dir: Path) -> None:
    """Mark the sandbox as this process's: once the process is gone, the janitor may remove it."""
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    (sandbox_dir / OWNER_FILE).write_text(str(os.getpid()))


def _owner_alive(sandbox_dir: Path) -> bool:
    try:
        owner = (sandbox_dir / OWNER_FILE).read_text()
    except FileNotFoundError:
        # Between claim's mkdir and its write the owner is not written yet: a pool on another
        # node of this machine (or this one's next refill) must not take that for abandoned.
        return _younger_than(sandbox_dir, CLAIM_GRACE_S)
    except OSError:
        return False
    try:
        os.kill(int(owner), 0)
    except (OSError, ValueError):  # an owner that has exited, or a file that is not a pid
        return False
    return True


def _younger_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def sweep(backend: Backend) -> list[str]:
    """Remove the sandboxes under this backend's state dir whose owner process has exited.

    Only names found there are touched, so deployments that share a cgroup root but not a state
    dir never remove each other's sandboxes.
    """
    root = backend.state_dir / "sandboxes"
    dead = {d.name for d in root.iterdir() if not _owner_alive(d)} if root.is_dir() else set()
    if not dead:
        return []
    if backend.cgroups is not None:
        backend.cgroups.sweep(lambda name: name not in dead)
    for name in dead:
        shutil.rmtree(root / name, ignore_errors=True)
    log.info("removed %d sandboxes left by exited processes: %s", len(dead), sorted(dead))
    return sorted(dead)
