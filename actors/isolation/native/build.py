"""Builds the `cave-exec` helper once per node (C, static), cached by a hash of its source."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from cave.errors import IsolationUnavailableError

SOURCE = Path(__file__).with_name("cave-exec.c")


def ensure_exec_helper(state_dir: Path) -> Path:
    """Path of the built helper; compiled on first use (static: it also runs in a custom rootfs)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = state_dir / "bin" / f"cave-exec-{digest}"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise IsolationUnavailableError("no C compiler to build the cave-exec helper (install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    for extra in (["-static"], []):  # static when libc.a exists, else dynamic against the host libc
        result = subprocess.run(
            [compiler, "-O2", *extra, "-o", str(staging), str(SOURCE)],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            os.replace(staging, target)  # atomic: concurrent builders on one node all succeed
            return target
    raise IsolationUnavailableError(f"cannot build the cave-exec helper: {result.stderr.strip()}")
