"""Builds the `cave-exec` helper once per node (C, static), cached by a hash of its source."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

from cave.errors import IsolationUnavailableError

SOURCE = Path(__file__).with_name("cave-exec.c")
PT_INTERP = 3  # an ELF program header naming a dynamic loader


def ensure_exec_helper(state_dir: Path) -> Path:
    """Path of the built helper; compiled on first use, static or not at all.

    Static because it holds the sandbox's capabilities until the command's exec: a dynamic loader
    would read LD_PRELOAD & co. and the sandbox root's libraries first. Static linking also lets it
    run in a custom rootfs. There is no dynamic fallback: without libc.a the build is refused.
    """
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = state_dir / "bin" / f"cave-exec-{digest}"
    if target.exists() and is_static(target):
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise IsolationUnavailableError("no C compiler to build the cave-exec helper (install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    result = subprocess.run(
        [compiler, "-O2", "-static", "-o", str(staging), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise IsolationUnavailableError(
            "cannot build the cave-exec helper statically (it is never built dynamically; install "
            f"the static C library, e.g. libc6-dev or glibc-static): {result.stderr.strip()[-600:]}"
        )
    if not is_static(staging):
        staging.unlink()
        raise IsolationUnavailableError(f"{compiler} -static produced a dynamic cave-exec helper")
    os.replace(staging, target)  # atomic: concurrent builders on one node all succeed
    return target


def is_static(path: Path) -> bool:
    """True when the ELF file at `path` names no dynamic loader (no PT_INTERP program header)."""
    with path.open("rb") as file:
        ident = file.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:  # ELFCLASS64 only
            return False
        order = "<" if ident[5] == 1 else ">"
        phoff, phentsize, phnum = (
            *struct.unpack_from(order + "Q", ident, 32),
            *struct.unpack_from(order + "HH", ident, 54),
        )
        file.seek(phoff)
        table = file.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        return False
    types = (struct.unpack_from(order + "I", table, i * phentsize)[0] for i in range(phnum))
    return PT_INTERP not in types
