"""Shared setup for the real-sandbox tests: one backend per session, sandboxes that always stop.

Every test here drives real namespaces, cgroups and seccomp, so it needs root and a kernel that
offers them; there is no fake backend. Sandboxes live on the event loop that started them, so a
test runs its whole body in one `asyncio.run` (the `async_test` decorator does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from actors.isolation.backend import Backend, select_backend
from actors.isolation.cgroups import read_mounts
from actors.isolation.results import ExecResult
from actors.isolation.sandbox import Sandbox
from config.settings import SandboxLimits, load_settings

LIMITS = SandboxLimits(
    memory_mb=256, pids=64, cpu=1, disk_mb=64, timeout_s=30, output_bytes=1 << 20
)
RUN_ID = uuid.uuid4().hex[:8]
TEST_ROOT = Path(f"/run/cave-test-{RUN_ID}")
CGROUP_ROOT = f"cave-test-{RUN_ID}"  # never the production "cave" subtree

P = ParamSpec("P")


def async_test(body: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body with asyncio.run; fixtures still arrive as arguments."""

    @functools.wraps(body)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(body(*args, **kwargs))

    return wrapper


def isolation_env(**extra: str) -> dict[str, str]:
    """CAVE_* variables for a test backend: a private state dir and cgroup subtree."""
    return {"CAVE_STATE_DIR": str(TEST_ROOT / "state"), "CAVE_CGROUP_ROOT": CGROUP_ROOT, **extra}


@pytest.fixture(scope="session")
def backend() -> Iterator[Backend]:
    if os.geteuid() != 0:
        pytest.fail("the isolation tests need root (namespaces, cgroups, uid maps)")
    settings = load_settings(env=isolation_env())
    chosen = select_backend(settings.isolation)
    assert chosen.isolated, f"expected the builtin backend here, got {chosen.name!r}"
    yield chosen
    shutil.rmtree(TEST_ROOT, ignore_errors=True)
    for directory in cgroup_dirs(""):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


@contextlib.asynccontextmanager
async def open_sandbox(backend: Backend, limits: SandboxLimits = LIMITS) -> AsyncIterator[Sandbox]:
    """A prepared and started sandbox, stopped on the way out whatever happened inside."""
    sandbox = Sandbox(backend)
    try:
        await sandbox.start(limits)  # prepares it first, with these limits
        yield sandbox
    finally:
        await sandbox.stop()


async def run(
    sandbox: Sandbox, command: list[str] | str, **kwargs: Any
) -> tuple[bytes, bytes, ExecResult]:
    """Collect one exec: (stdout, stderr, result). A string is a shell script for `sh -c`."""
    argv = ["sh", "-c", command] if isinstance(command, str) else command
    out, err = bytearray(), bytearray()
    result: ExecResult | None = None
    async for item in sandbox.exec(argv, **kwargs):
        if isinstance(item, ExecResult):
            result = item
        else:
            (out if item.stream == "stdout" else err).extend(item.data)
    assert result is not None, "the exec stream ended without a result"
    return bytes(out), bytes(err), result


async def assert_still_works(sandbox: Sandbox) -> None:
    out, err, result = await run(sandbox, ["echo", "ok"])
    assert (out, result.exit_code) == (b"ok\n", 0), err


async def assert_host_and_next_sandbox_fine(backend: Backend) -> None:
    """After an attack: the host can still fork and a fresh sandbox runs a command."""
    host = subprocess.run(["echo", "host ok"], capture_output=True, timeout=30)
    assert host.stdout == b"host ok\n"
    async with open_sandbox(backend) as fresh:
        await assert_still_works(fresh)


def cgroup_dirs(sandbox_id: str) -> list[str]:
    """Where the sandbox's cgroup lives in every hierarchy (v1) or the unified one (v2)."""
    return [
        os.path.join(m.path, CGROUP_ROOT, sandbox_id)
        for m in read_mounts()
        if os.path.isdir(os.path.join(m.path, CGROUP_ROOT))
    ]


def host_pids_with_cmdline(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly `argv` (zombies have none, so they never match)."""
    wanted = b"\0".join(a.encode() for a in argv) + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(entry.path, "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
    return found


async def poll_until(done: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition, checking often, failing with `what` past the deadline."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout_s}s"
        await asyncio.sleep(0.02)


def unique_sleep() -> str:
    """A sleep duration no other process on this host uses, to find ours by its command line."""
    return f"1000.{uuid.uuid4().int % 10**9:09d}"
