"""Launchers are forked by one pre-imported server per host process: they start from it with a
clean environment, a dead server is replaced at the next sandbox, and what it started is
stopped and waited for like a child."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from actors.isolation import sandbox as sandbox_module
from actors.isolation.backend import Backend
from tests.isolation.conftest import (
    assert_still_works,
    async_test,
    open_sandbox,
    poll_until,
    run,
)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in raw if b"=" in entry)


def _sockets(pid: int) -> set[str]:
    """The socket inodes among a process's open files."""
    fds = Path(f"/proc/{pid}/fd")
    links = {os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()}
    return {link for link in links if link.startswith("socket:")}


def _server_pid() -> int:
    server = sandbox_module._fork_server()._server
    assert server is not None
    return server.pid


@async_test
async def test_a_launcher_is_a_fork_of_the_server_with_a_clean_environment(
    backend: Backend,
) -> None:
    os.environ["CAVE_TEST_SECRET"] = "must-not-reach-a-sandbox"
    try:
        async with open_sandbox(backend) as sandbox:
            await assert_still_works(sandbox)
            launcher = sandbox._launcher
            assert launcher is not None
            server = _server_pid()
            assert _parent(launcher.pid) == server and _parent(server) == os.getpid()
            assert b"actors.isolation.forkserver" in Path(f"/proc/{server}/cmdline").read_bytes()
            for pid in (server, launcher.pid):
                assert set(_environ(pid)) == {"PATH", "PYTHONPATH"}
            # Nothing a sandbox's processes hold reaches the server: what it forks keeps no end
            # of the server's control socket (which could ask for launchers at will).
            assert _sockets(server) and not _sockets(server) & _sockets(launcher.pid)
            out, _, _ = await run(sandbox, ["env"])
            assert b"must-not-reach" not in out
    finally:
        del os.environ["CAVE_TEST_SECRET"]
    # Waited for through its pidfd at the stop, and reaped by the server.
    await poll_until(lambda: not Path(f"/proc/{launcher.pid}").exists(), "the launcher reaped")


@async_test
async def test_a_dead_fork_server_is_replaced_and_running_sandboxes_go_on(
    backend: Backend,
) -> None:
    async with open_sandbox(backend) as first:
        await assert_still_works(first)
        old = _server_pid()
        os.kill(old, signal.SIGKILL)
        dead = sandbox_module._fork_server()._server
        assert dead is not None and dead.wait(10) == -signal.SIGKILL
        await assert_still_works(first)  # its launcher does not depend on the server
        async with open_sandbox(backend) as second:
            await assert_still_works(second)
            assert _server_pid() != old


@async_test
async def test_the_server_ends_when_its_host_closes_it(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        await assert_still_works(sandbox)
    server = sandbox_module._fork_server()
    pid = _server_pid()
    assert server._server is not None
    popen = server._server
    server._stop()  # what the host's exit does: its end of the socket closes...
    assert popen.returncode == 0  # ...and the server exits by itself (not killed)
    assert not Path(f"/proc/{pid}").exists()


@async_test
async def test_a_hung_fork_server_is_replaced_not_waited_for(backend: Backend) -> None:
    async with open_sandbox(backend) as first:
        await assert_still_works(first)
        old = _server_pid()
        os.kill(old, signal.SIGSTOP)  # alive, but answers nothing
        async with open_sandbox(backend) as second:
            await assert_still_works(second)
            assert _server_pid() != old
            assert not Path(f"/proc/{old}").exists()  # the hung one was ended
