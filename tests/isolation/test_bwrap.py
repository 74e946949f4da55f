"""The bubblewrap backend, with the real bwrap: what a sandbox user sees and what the host sees."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.isolation import backend as backend_module
from actors.isolation.backend import Backend, select_backend
from actors.isolation.cgroups import read_mounts
from cave.errors import IsolationUnavailableError
from config.settings import load_settings
from tests.isolation.conftest import (
    CGROUP_ROOT,
    LIMITS,
    TEST_ROOT,
    assert_still_works,
    async_test,
    host_pids_with_cmdline,
    open_sandbox,
    poll_until,
    run,
    unique_sleep,
)

STATE_DIR = TEST_ROOT / "bwrap-state"
# A subtree of its own: removing it never pulls the one conftest's session backend relies on.
BWRAP_CGROUP_ROOT = f"{CGROUP_ROOT}-bwrap"


def bwrap_env(**extra: str) -> dict[str, str]:
    """CAVE_* variables for a bwrap backend with its own state dir and cgroup subtree."""
    variables = {
        "CAVE_STATE_DIR": str(STATE_DIR),
        "CAVE_CGROUP_ROOT": BWRAP_CGROUP_ROOT,
        "CAVE_ISOLATION_BACKEND": "bwrap",
        **extra,
    }
    return {**os.environ, **variables}


@pytest.fixture(scope="module")
def bwrap_backend() -> Iterator[Backend]:
    if os.geteuid() != 0:
        pytest.fail("the bwrap tests need root (cgroups, running bwrap as the sandbox uid)")
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    yield select_backend(load_settings(env=bwrap_env()).isolation)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    leftovers: list[str | Path] = [*_cgroup_roots(), TEST_ROOT]  # TEST_ROOT if nothing uses it
    for directory in leftovers:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _cgroup_roots() -> list[str]:
    return [
        os.path.join(m.path, BWRAP_CGROUP_ROOT)
        for m in read_mounts()
        if os.path.isdir(os.path.join(m.path, BWRAP_CGROUP_ROOT))
    ]


def test_backend_is_bwrap(bwrap_backend: Backend) -> None:
    assert (bwrap_backend.name, bwrap_backend.isolated) == ("bwrap", True)
    assert bwrap_backend.bwrap_path == shutil.which("bwrap")


@async_test
async def test_echo_runs(bwrap_backend: Backend) -> None:
    async with open_sandbox(bwrap_backend) as sandbox:
        await assert_still_works(sandbox)


@async_test
async def test_root_inside_is_the_sandbox_uid_on_the_host(bwrap_backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(bwrap_backend) as sandbox:
        out, _, _ = await run(sandbox, ["id", "-u"])
        assert out == b"0\n"
        sleeping = asyncio.ensure_future(run(sandbox, ["sleep", duration], timeout_s=20))
        await poll_until(
            lambda: host_pids_with_cmdline(["sleep", duration]) != [], "the sleep never started"
        )
        [pid] = host_pids_with_cmdline(["sleep", duration])
        status = Path(f"/proc/{pid}/status").read_text()
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        os.kill(pid, signal.SIGKILL)
        _, _, result = await sleeping
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(bwrap_backend.sandbox_uid)] * 4
    assert f"{BWRAP_CGROUP_ROOT}/{sandbox.id}" in cgroup  # the cgroup limits still apply
    assert result.exit_code == 128 + signal.SIGKILL


@async_test
async def test_no_network(bwrap_backend: Backend) -> None:
    connect = (
        "import socket\n"
        "try:\n    socket.create_connection(('127.0.0.1', 5432), timeout=3)\n"
        "except OSError as e:\n    print(type(e).__name__)\nelse:\n    print('connected')"
    )
    async with open_sandbox(bwrap_backend) as sandbox:
        out, err, _ = await run(sandbox, ["python3", "-c", connect])
        interfaces, _, _ = await run(sandbox, "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert out == b"ConnectionRefusedError\n", err
    assert interfaces.split() == [b"lo"]


@async_test
async def test_host_secrets_are_not_readable(bwrap_backend: Backend) -> None:
    async with open_sandbox(bwrap_backend) as sandbox:
        out, _, result = await run(sandbox, "cat /etc/shadow")
        listing, _, _ = await run(sandbox, ["ls", "/etc", "/opt/cave/actors"])
    assert result.exit_code != 0 and out == b""
    assert b"shadow" not in listing and b"isolation" in listing  # our source only, read-only


@async_test
async def test_root_is_read_only_outside_the_writable_places(bwrap_backend: Backend) -> None:
    async with open_sandbox(bwrap_backend) as sandbox:
        _, err, result = await run(sandbox, "touch /usr/x || touch /etc/x || touch /x")
        assert result.exit_code != 0 and b"Read-only file system" in err
        _, err, result = await run(
            sandbox,
            "for d in /workspace /tmp /var/tmp /root /run; do echo x > $d/f || exit 1; done",
        )
        assert result.exit_code == 0, err


@async_test
async def test_disk_quota_gives_enospc(bwrap_backend: Backend) -> None:
    async with open_sandbox(bwrap_backend) as sandbox:
        _, err, result = await run(
            sandbox, f"dd if=/dev/zero of=/workspace/big bs=1M count={LIMITS.disk_mb + 8}"
        )
        assert result.exit_code != 0
        assert b"No space left on device" in err
        await run(sandbox, "rm /workspace/big")
        await assert_still_works(sandbox)


@async_test
async def test_timeout_kills_the_command(bwrap_backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(bwrap_backend) as sandbox:
        _, _, result = await run(sandbox, f"sleep {duration} & sleep {duration}", timeout_s=0.5)
        assert (result.timed_out, result.exit_code) == (True, 124)
        await poll_until(
            lambda: host_pids_with_cmdline(["sleep", duration]) == [],
            "a sleep outlived its timed-out exec",
        )
        await assert_still_works(sandbox)


@async_test
async def test_stop_leaves_no_process(bwrap_backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(bwrap_backend) as sandbox:
        running = asyncio.ensure_future(run(sandbox, f"sleep {duration} & sleep {duration}"))
        await poll_until(
            lambda: len(host_pids_with_cmdline(["sleep", duration])) == 2,
            "the sleeps never started",
        )
        zygote = sandbox._zygote_pid  # the pid the launcher reported as `spawned`
        pid_ns = os.readlink(f"/proc/{zygote}/ns/pid")
        assert pid_ns != os.readlink("/proc/self/ns/pid")
        await sandbox.stop()
        with contextlib.suppress(Exception):
            await running
    await poll_until(lambda: _processes_in(pid_ns) == [], "processes outlived stop")
    assert host_pids_with_cmdline(["sleep", duration]) == []
    assert all(not os.path.exists(os.path.join(d, sandbox.id)) for d in _cgroup_roots())


def _processes_in(pid_ns: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and os.readlink(f"{entry.path}/ns/pid") == pid_ns:
                found.append(int(entry.name))
    return found


@async_test
async def test_files_round_trip(bwrap_backend: Backend) -> None:
    async with open_sandbox(bwrap_backend) as sandbox:
        assert await sandbox.files.write("a/b.txt", b"hello\n") == 6
        out, _, _ = await run(sandbox, "cat /workspace/a/b.txt; echo made > /workspace/a/c.txt")
        assert out == b"hello\n"
        assert await sandbox.files.read("a/c.txt") == b"made\n"
        assert [e.name for e in await sandbox.files.list("a")] == ["b.txt", "c.txt"]
        await run(sandbox, "chmod 000 /workspace/a")  # the zygote still cleans up after it
        await sandbox.files.delete("a", recursive=True)
        assert await sandbox.files.list() == []


def test_auto_falls_back_to_bwrap(bwrap_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "namespaces_work", lambda: False)
    chosen = select_backend(load_settings(env=bwrap_env(CAVE_ISOLATION_BACKEND="auto")).isolation)
    assert chosen.name == "bwrap"


def test_missing_bwrap_is_refused_with_a_clear_error(bwrap_backend: Backend) -> None:
    settings = load_settings(
        env=bwrap_env(CAVE_BWRAP_PATH="/nonexistent", CAVE_ISOLATION_NO_FALLBACK="true")
    )
    with pytest.raises(
        IsolationUnavailableError, match="bwrap: CAVE_BWRAP_PATH=/nonexistent: no such executable"
    ):
        select_backend(settings.isolation)
