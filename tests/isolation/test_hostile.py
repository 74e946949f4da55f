"""Hostile programs in real sandboxes: each attack fails; the host and the next sandbox are fine."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import uuid
from errno import EMFILE
from pathlib import Path

import pytest

from actors.isolation import launcher
from actors.isolation.backend import Backend
from actors.isolation.native.build import ensure_exec_helper, is_static
from actors.isolation.results import ExecResult
from actors.isolation.stdin_feed import StdinFeed
from cave.errors import IsolationUnavailableError, QuotaExceededError
from tests.isolation.conftest import (
    LIMITS,
    TEST_ROOT,
    assert_host_and_next_sandbox_fine,
    assert_still_works,
    async_test,
    cgroup_dirs,
    host_pids_with_cmdline,
    open_sandbox,
    poll_until,
    run,
    unique_sleep,
)

MiB = 1 << 20
FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def _cgroup_file(sandbox_id: str, name: str) -> str:
    for directory in cgroup_dirs(sandbox_id):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise AssertionError(f"no {name} in the cgroup of sandbox {sandbox_id}")


def _pids_limit_hits(sandbox_id: str) -> int:
    for line in Path(_cgroup_file(sandbox_id, "pids.events")).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "max":
            return int(value)
    raise AssertionError("pids.events has no 'max' line")


# The shell bomb keeps its first shell alive: when an exec's command exits, its pid namespace
# (and any bomb left in it) dies with it, which would end the attack before it starts.
FORK_BOMBS = {
    "python": ["python3", "-c", FORK_BOMB],
    "bash": ["bash", "-c", "bomb() { bomb | bomb & }; bomb; sleep 1000"],
}


@pytest.mark.parametrize("bomb", FORK_BOMBS.values(), ids=FORK_BOMBS.keys())
@async_test
async def test_fork_bomb_is_held_by_the_pids_limit(backend: Backend, bomb: list[str]) -> None:
    async with open_sandbox(backend) as sandbox:
        _, _, result = await run(sandbox, bomb, timeout_s=3)
        assert (result.timed_out, result.exit_code) == (True, 124)
        assert _pids_limit_hits(sandbox.id) > 0, "the bomb never reached the pids limit"
        assert Path(_cgroup_file(sandbox.id, "pids.max")).read_text().strip() == str(LIMITS.pids)
        await assert_still_works(sandbox)
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_memory_bomb_is_oom_killed(backend: Backend) -> None:
    chunks = 2 * LIMITS.memory_mb // 16
    bomb = f"chunks = [b'x' * (16 << 20) for _ in range({chunks})]; print('survived')"
    async with open_sandbox(backend) as sandbox:
        out, _, result = await run(sandbox, ["python3", "-c", bomb])
        assert (result.exit_code, result.oom_killed) == (137, True)
        assert b"survived" not in out
        await assert_still_works(sandbox)
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_disk_fill_stops_at_the_quota(backend: Backend) -> None:
    count = 2 * LIMITS.disk_mb
    async with open_sandbox(backend) as sandbox:
        _, err, result = await run(
            sandbox, ["dd", "if=/dev/zero", "of=/workspace/big", "bs=1M", f"count={count}"]
        )
        assert result.exit_code != 0
        assert b"No space left on device" in err
        (entry,) = [e for e in await sandbox.files.list() if e.name == "big"]
        assert LIMITS.disk_mb * MiB // 2 < entry.size <= LIMITS.disk_mb * MiB  # stopped by quota
        await assert_still_works(sandbox)
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_file_api_write_beyond_the_quota_is_refused(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(QuotaExceededError):
            await sandbox.files.write("big", bytes(2 * LIMITS.disk_mb * MiB))
        await sandbox.files.delete("big")
        await sandbox.files.write("small", b"fits")
        assert await sandbox.files.read("small") == b"fits"
    await assert_host_and_next_sandbox_fine(backend)


def _reset_peak_rss() -> None:
    # ru_maxrss is a high-water mark: earlier tests (the 128 MiB write above) would hide any
    # growth here. Writing 5 to clear_refs resets the mark to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


@async_test
async def test_100_mb_of_output_is_capped_without_buffering_it(backend: Backend) -> None:
    total = 100_000_000
    async with open_sandbox(backend) as sandbox:
        _reset_peak_rss()
        rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out, _, result = await run(sandbox, ["head", "-c", str(total), "/dev/zero"])
        rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib
        assert result.exit_code == 0
        assert result.truncated
        assert out == bytes(LIMITS.output_bytes)
        assert result.stdout_bytes == total
        assert rss_growth_kib < 50 * 1024, f"the host buffered the output: +{rss_growth_kib} KiB"
        await assert_still_works(sandbox)
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_timeout_kills_double_forked_children(backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(backend) as sandbox:
        _, _, result = await run(
            sandbox, f"(setsid sleep {duration} &); sleep {duration}", timeout_s=1
        )
        assert (result.timed_out, result.exit_code) == (True, 124)
        await poll_until(
            lambda: not host_pids_with_cmdline(["sleep", duration]),
            "the double-forked sleep still runs on the host",
        )
        await assert_still_works(sandbox)
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_daemon_left_by_a_finished_command_is_gone(backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(backend) as sandbox:
        _, _, result = await run(sandbox, f"setsid sleep {duration} & exit 0")
        assert (result.timed_out, result.exit_code) == (False, 0)
        assert host_pids_with_cmdline(["sleep", duration]) == []
    await assert_host_and_next_sandbox_fine(backend)


CONNECT = """
import errno, socket, sys
for host, port in [tuple(a.split(":")) for a in sys.argv[1:]]:
    unix = host == "abstract"
    s = socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
    s.settimeout(10)
    try:
        s.connect("\\0" + port if unix else (host, int(port)))
        print(host, port, "CONNECTED")
    except OSError as exc:
        print(host, port, errno.errorcode.get(exc.errno, str(exc)))
"""


@async_test
async def test_network_egress_is_cut(backend: Backend) -> None:
    abstract = f"cave-test-{uuid.uuid4().hex}"  # abstract unix sockets belong to the net namespace
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.socket(socket.AF_UNIX) as unix_listener,
    ):
        host_port = listener.getsockname()[1]
        unix_listener.bind("\0" + abstract)
        unix_listener.listen()
        socket.create_connection(("127.0.0.1", host_port), timeout=5).close()  # reachable here
        with socket.socket(socket.AF_UNIX) as client:
            client.connect("\0" + abstract)
        async with open_sandbox(backend) as sandbox:
            out, err, result = await run(
                sandbox,
                [
                    "python3",
                    "-c",
                    CONNECT,
                    "127.0.0.1:5432",
                    f"127.0.0.1:{host_port}",
                    "1.1.1.1:53",
                    "10.0.2.2:80",
                    f"abstract:{abstract}",
                ],
            )
    assert result.exit_code == 0, err
    assert out.decode().splitlines() == [
        "127.0.0.1 5432 ECONNREFUSED",
        f"127.0.0.1 {host_port} ECONNREFUSED",
        "1.1.1.1 53 ENETUNREACH",
        "10.0.2.2 80 ENETUNREACH",
        f"abstract {abstract} ECONNREFUSED",
    ]
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_only_loopback_exists_and_it_works(backend: Backend) -> None:
    echo = (
        "import socket\nserver = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname())\n"
        "conn, _ = server.accept(); client.sendall(b'ping'); print(conn.recv(4).decode())"
    )
    async with open_sandbox(backend) as sandbox:
        dev, _, _ = await run(sandbox, ["cat", "/proc/net/dev"])
        out, err, result = await run(sandbox, ["python3", "-c", echo])
    interfaces = [line.split(":")[0].strip() for line in dev.decode().splitlines()[2:]]
    assert interfaces == ["lo"]
    assert (out, result.exit_code) == (b"ping\n", 0), err
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_host_files_are_out_of_reach(backend: Backend) -> None:
    host_root_entries = set(os.listdir("/root"))
    markers = [Path(d, f"cave-test-marker-{uuid.uuid4().hex}") for d in ("/tmp", "/dev/shm")]
    for marker in markers:
        marker.write_text("host secret")
    try:
        async with open_sandbox(backend) as sandbox:
            for path in ("/etc/shadow", "/proc/1/root/etc/shadow", "/proc/1/environ"):
                out, _, result = await run(sandbox, ["cat", path])
                assert result.exit_code != 0 and out == b"", f"read {path} inside the sandbox"
            for path in ("/work", "/work/main", str(TEST_ROOT), *map(str, markers)):
                _, _, result = await run(sandbox, ["ls", path])
                assert result.exit_code != 0, f"{path} is visible inside the sandbox"
            root, _, _ = await run(sandbox, ["ls", "-A", "/root"])
            passwd, _, _ = await run(sandbox, ["cat", "/etc/passwd"])
    finally:
        for marker in markers:
            marker.unlink()
    assert host_root_entries.isdisjoint(root.decode().split())
    assert {line.split(":")[0] for line in passwd.decode().splitlines()} == {"root", "nobody"}
    await assert_host_and_next_sandbox_fine(backend)


SYSCALL_NUMBERS = {
    "x86_64": {
        "ptrace": 101,
        "mount": 165,
        "unshare": 272,
        "keyctl": 250,
        "bpf": 321,
        "io_uring_setup": 425,
    },
    "aarch64": {
        "ptrace": 117,
        "mount": 40,
        "unshare": 97,
        "keyctl": 219,
        "bpf": 280,
        "io_uring_setup": 425,
    },
}
# Each call would succeed (or fail otherwise than EPERM) for an unfiltered process with these args.
PRIVILEGED_CALLS = """
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
numbers = json.loads(sys.argv[1])
params = ctypes.create_string_buffer(120)
args = {
    "ptrace": (16, 1, 0, 0),                            # PTRACE_ATTACH to pid 1
    "mount": (b"none", b"/tmp", b"tmpfs", 0),
    "unshare": (0x10000000,),                          # CLONE_NEWUSER
    "keyctl": (0, ctypes.c_long(-3), 0),               # KEYCTL_GET_KEYRING_ID, session keyring
    "bpf": (0, params, 72),                            # BPF_MAP_CREATE
    "io_uring_setup": (1, params),
}
for name, number in numbers.items():
    ctypes.set_errno(0)
    rc = libc.syscall(number, *args[name])
    print(name, rc, ctypes.get_errno())
"""


@async_test
async def test_privileged_syscalls_are_refused(backend: Backend) -> None:
    numbers = SYSCALL_NUMBERS.get(platform.machine())
    assert numbers is not None, f"no syscall numbers for {platform.machine()}"
    async with open_sandbox(backend) as sandbox:
        out, err, result = await run(
            sandbox, ["python3", "-c", PRIVILEGED_CALLS, json.dumps(numbers)]
        )
        uid, _, _ = await run(sandbox, ["id", "-u"])
        status, _, _ = await run(sandbox, ["cat", "/proc/self/status"])
    assert result.exit_code == 0, err
    assert out.decode().splitlines() == [f"{name} -1 1" for name in numbers]  # 1 is EPERM
    assert uid == b"0\n"
    assert "CapEff:\t0000000000000000" in status.decode().splitlines()
    await assert_host_and_next_sandbox_fine(backend)


def _uid_line(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


@async_test
async def test_sandbox_processes_run_as_the_unprivileged_uid(backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(backend) as sandbox:
        sleeper = asyncio.ensure_future(run(sandbox, ["sleep", duration]))
        try:
            await poll_until(
                lambda: host_pids_with_cmdline(["sleep", duration]) != [],
                "the sandbox's sleep never appeared on the host",
            )
            (pid,) = host_pids_with_cmdline(["sleep", duration])
            assert _uid_line(pid) == [backend.sandbox_uid] * 4
            members = [
                int(p) for p in Path(_cgroup_file(sandbox.id, "cgroup.procs")).read_text().split()
            ]
            assert pid in members
            assert all(_uid_line(p) == [backend.sandbox_uid] * 4 for p in members)
            os.kill(pid, signal.SIGKILL)  # the host may signal the sandbox, not the reverse
            _, _, result = await sleeper
            assert result.exit_code == 137
        finally:
            sleeper.cancel()
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_only_the_sandboxs_own_processes_are_visible(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        listing, _, _ = await run(sandbox, ["ls", "/proc"])
        ps, ps_err, ps_result = await run(sandbox, ["ps", "-ef"])
    pids = [name for name in listing.decode().split() if name.isdigit()]
    assert 0 < len(pids) < 10, pids
    assert ps_result.exit_code == 0, f"`ps -ef` fails inside the sandbox: {ps_err!r}"
    names = [
        os.path.basename(line.split(None, 7)[7].split()[0])  # program of the CMD column
        for line in ps.decode().splitlines()[1:]
    ]
    assert 0 < len(names) < 10 and "ps" in names, names
    assert not {"postgres", "pytest", "sshd", "systemd"} & set(names)
    await assert_host_and_next_sandbox_fine(backend)


@async_test
async def test_host_processes_cannot_be_signalled(backend: Backend) -> None:
    bystander = subprocess.Popen(["sleep", unique_sleep()])
    probe = (
        "import os\ntry:\n os.kill(int(os.environ['HOST_PID']), 0)\n"
        "except OSError as e:\n print(e.errno)"
    )
    try:
        async with open_sandbox(backend) as sandbox:
            _, kill_err, kill = await run(sandbox, ["kill", "-9", str(bystander.pid)])
            esrch, _, _ = await run(
                sandbox, ["python3", "-c", probe], env={"HOST_PID": str(os.getpid())}
            )
            init_out, _, _ = await run(sandbox, "kill -9 1; echo still here")
            await assert_still_works(sandbox)
        assert bystander.poll() is None, "a sandbox killed a host process"
    finally:
        bystander.kill()
        bystander.wait()
    assert kill.exit_code != 0 and b"No such process" in kill_err, kill_err
    assert esrch == b"3\n"  # ESRCH: the test process does not exist in there
    assert init_out == b"still here\n"
    await assert_host_and_next_sandbox_fine(backend)


def _processes_in_cgroup(sandbox_id: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if sandbox_id in Path(entry.path, "cgroup").read_text():
                    found.append(int(entry.name))
    return found


@async_test
async def test_no_traces_between_sandboxes_or_after_stop(backend: Backend) -> None:
    async with open_sandbox(backend) as first:
        _, err, result = await run(
            first, "set -e; echo secret > /tmp/trace; echo secret > /dev/shm/trace"
        )
        assert result.exit_code == 0, err
        assert all(os.path.isdir(d) for d in cgroup_dirs(first.id)) and cgroup_dirs(first.id)
        assert first.sandbox_dir.is_dir()
        async with open_sandbox(backend) as second:
            out, _, _ = await run(second, "ls -A /tmp /dev/shm; cat /tmp/trace /dev/shm/trace")
            assert b"secret" not in out and b"trace" not in out
    assert _processes_in_cgroup(first.id) == []
    assert not any(os.path.exists(d) for d in cgroup_dirs(first.id))
    assert first.id not in Path("/proc/self/mountinfo").read_text()
    assert not first.sandbox_dir.exists()
    assert not (backend.state_dir / "sandboxes" / first.id).exists()


# --- the sandbox kernel: cave-exec, user namespace limits, rlimits, /proc (issue 11) ---
EVIL_SO = r"""
#include <stdio.h>
#include <string.h>
/* Loaded by LD_PRELOAD: note which process loaded it and with what privileges. */
__attribute__((constructor)) static void mark(void) {
    FILE *status = fopen("/proc/self/status", "r"), *out = fopen("/tmp/preload-marker", "a");
    char line[256];
    if (!status || !out) return;
    while (fgets(line, sizeof line, status))
        if (!strncmp(line, "CapEff:", 7) || !strncmp(line, "Seccomp:", 8)) fputs(line, out);
    fputs("--\n", out);
    fclose(out);
    fclose(status);
}
"""


@async_test
async def test_ld_preload_never_reaches_cave_exec(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        await sandbox.files.write("evil.c", EVIL_SO.encode())
        _, err, built = await run(sandbox, "gcc -shared -fPIC -o /tmp/evil.so /workspace/evil.c")
        assert built.exit_code == 0, err
        env = {"LD_PRELOAD": "/tmp/evil.so", "LD_LIBRARY_PATH": "/tmp", "GCONV_PATH": "/tmp"}
        _, err, result = await run(sandbox, ["true"], env=env)
        assert result.exit_code == 0, err
        marker, _, _ = await run(sandbox, ["cat", "/tmp/preload-marker"])
    loads = [block.strip() for block in marker.decode().split("--") if block.strip()]
    # The command (dynamic `true`) loaded it, once, after every privilege was gone; cave-exec,
    # which held the sandbox's capabilities, never did.
    assert loads == ["CapEff:\t0000000000000000\nSeccomp:\t2"]
    await assert_host_and_next_sandbox_fine(backend)


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid line for pid {pid}")


@async_test
async def test_cave_exec_is_static_and_runs_with_no_environment(backend: Backend) -> None:
    assert is_static(backend.exec_helper)
    assert not is_static(Path("/bin/sh").resolve())  # the check does tell dynamic from static
    duration = unique_sleep()
    async with open_sandbox(backend) as sandbox:
        sleeper = asyncio.ensure_future(
            run(sandbox, ["sleep", duration], env={"SECRET_TOKEN": "s3cr3t"})
        )
        try:
            await poll_until(
                lambda: host_pids_with_cmdline(["sleep", duration]) != [],
                "the sandbox's sleep never appeared on the host",
            )
            (pid,) = host_pids_with_cmdline(["sleep", duration])
            init = _ppid(pid)  # cave-exec as the exec's pid 1, then cave-exec itself
            helpers = [init, _ppid(init)]
            assert b"SECRET_TOKEN=s3cr3t" in Path(f"/proc/{pid}/environ").read_bytes()
            for helper in helpers:
                assert Path(f"/proc/{helper}/cmdline").read_bytes().startswith(b"cave-exec\0")
                assert Path(f"/proc/{helper}/environ").read_bytes() == b""
                assert b"s3cr3t" not in Path(f"/proc/{helper}/cmdline").read_bytes()
            os.kill(pid, signal.SIGKILL)
            await sleeper
        finally:
            sleeper.cancel()


def _fake_compiler(directory: Path, script: str) -> None:
    directory.mkdir()
    cc = directory / "cc"
    cc.write_text(f"#!/bin/sh\n{script}\n")
    cc.chmod(0o755)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ('for a; do [ "$a" = -static ] && exit 1; done; exec /usr/bin/gcc "$@"', "statically"),
        (
            'args=; for a; do [ "$a" = -static ] || args="$args $a"; done; exec /usr/bin/gcc $args',
            "produced a dynamic",
        ),
    ],
    ids=["no-static-libc", "links-dynamically"],
)
def test_a_cave_exec_that_cannot_be_static_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, message: str
) -> None:
    _fake_compiler(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")  # ours is found first
    with pytest.raises(IsolationUnavailableError, match=message):
        ensure_exec_helper(tmp_path / "state")
    assert not list((tmp_path / "state" / "bin").iterdir())  # nothing left to be picked up later


INOTIFY_HOG = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while (fd := libc.inotify_init1(0)) >= 0:
    fds.append(fd)
print(len(fds), ctypes.get_errno(), flush=True)
sys.stdin.read()  # hold them until the test is done
"""
NS_GET_OWNER_UID = 0xB704


def _host_inotify_works() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    if fd >= 0:
        os.close(fd)
    return fd >= 0


def _user_ns_owner(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        uid = ctypes.c_uint32()
        assert fcntl.ioctl(fd, NS_GET_OWNER_UID, uid) == 0
        return uid.value
    finally:
        os.close(fd)


@async_test
async def test_inotify_exhaustion_stays_inside_the_sandbox(backend: Backend) -> None:
    async with open_sandbox(backend) as hog, open_sandbox(backend) as neighbour:
        assert hog._zygote_pid is not None
        assert _user_ns_owner(hog._zygote_pid) not in (0, backend.sandbox_uid)
        feed = StdinFeed()
        checked = False
        async for item in hog.exec(["python3", "-c", INOTIFY_HOG], stdin=feed):
            if isinstance(item, ExecResult):
                assert item.exit_code == 0
            elif item.stream == "stdout" and not checked:
                count, err = map(int, item.data.split())
                assert (count, err) == (launcher.USER_NS_LIMITS["max_inotify_instances"], EMFILE)
                assert _host_inotify_works(), "the host lost its inotify budget to a sandbox"
                out, err_b, result = await run(
                    neighbour,
                    [
                        "python3",
                        "-c",
                        "import ctypes; print(ctypes.CDLL(None).inotify_init1(0) >= 0)",
                    ],
                )
                assert (out, result.exit_code) == (b"True\n", 0), err_b
                checked = True
                feed.close()
        assert checked
    await assert_host_and_next_sandbox_fine(backend)


FILE_HOG = """
import os, resource
print(*resource.getrlimit(resource.RLIMIT_NOFILE), *resource.getrlimit(resource.RLIMIT_CORE))
for limit, value in ((resource.RLIMIT_NOFILE, 1 << 20), (resource.RLIMIT_CORE, 1 << 30)):
    try:
        resource.setrlimit(limit, (value, value))
        print("raised")
    except (ValueError, OSError) as exc:
        print("refused")
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    print(len(fds) < 4096, exc.errno)
"""


@async_test
async def test_open_files_are_capped_and_no_core_is_dumped(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        out, err, result = await run(sandbox, ["python3", "-c", FILE_HOG])
        shell, _, _ = await run(sandbox, "ulimit -Sn; ulimit -Hn; ulimit -c")
        # A crash leaves no core, even when the command asks for one.
        left, _, crashed = await run(
            sandbox, "cd /tmp && (ulimit -c unlimited; sh -c 'kill -SEGV $$'); ls -A /tmp"
        )
        await assert_still_works(sandbox)
    assert result.exit_code == 0, err
    assert out.decode().splitlines() == ["4096 4096 0 0", "refused", "refused", f"True {EMFILE}"]
    assert shell == b"4096\n4096\n0\n"
    assert (crashed.exit_code, left) == (0, b"")
    await assert_host_and_next_sandbox_fine(backend)


PROC_PROBE = """
import errno, os
for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/kallsyms",
             "/proc/sched_debug", "/proc/sysrq-trigger"):
    try:
        with open(path, "rb") as f:
            print(path, len(f.read(4096)))
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
for path in ("/proc/acpi", "/proc/driver"):
    print(path, os.listdir(path) if os.path.isdir(path) else "absent")
for path in ("/proc/sys/user/max_inotify_instances", "/proc/sys/kernel/hostname"):
    try:
        with open(path, "w") as f:
            f.write("1")
        print(path, "written")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
print(open("/proc/sys/user/max_inotify_instances").read().strip())
print(len(open("/proc/meminfo").read()) > 0, len(open("/proc/self/status").read()) > 0)
"""


@async_test
async def test_proc_hides_the_host(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        out, err, result = await run(sandbox, ["python3", "-c", PROC_PROBE])
    assert result.exit_code == 0, err
    lines = dict(line.split(" ", 1) for line in out.decode().splitlines()[:-2])
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/kallsyms"):
        assert lines[path] in ("0", "ENOENT"), (path, lines[path])  # /dev/null over it, or absent
    for path in ("/proc/sched_debug", "/proc/sysrq-trigger"):
        assert lines[path] in ("0", "ENOENT", "EACCES"), (path, lines[path])
    for path in ("/proc/acpi", "/proc/driver"):
        assert lines[path] in ("[]", "absent"), (path, lines[path])
    assert lines["/proc/sys/user/max_inotify_instances"] == "EROFS"
    assert lines["/proc/sys/kernel/hostname"] == "EROFS"
    assert out.decode().splitlines()[-2:] == [
        str(launcher.USER_NS_LIMITS["max_inotify_instances"]),
        "True True",
    ]
    await assert_host_and_next_sandbox_fine(backend)
