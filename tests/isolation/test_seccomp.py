"""Hostile programs run through the real cave-exec helper: refused calls, foreign ABIs, normal work.

Every probe is started as production starts a command: `cave-exec ISOLATED BPF_FD ENV_FD CWD --
ARGV`, with the compiled policy and the command's environment in memfds, cave-exec itself with no
environment. ISOLATED=0 keeps the tests independent of namespaces (one test
checks ISOLATED=1). BPF_FD=-1 runs the same probe with every capability dropped and no filter, which
shows which refusals only the filter gives. The probes run as root on the host, so a call that goes
through in that run uses harmless arguments, in a throwaway fork.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from actors.isolation import seccomp_policy
from actors.isolation.backend import Backend
from actors.isolation.native.build import ensure_exec_helper
from actors.isolation.zygote import DEFAULT_ENV, environment_memfd
from cave.errors import IsolationUnavailableError
from tests.isolation.conftest import LIMITS, async_test, open_sandbox, run

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="syscall arguments and foreign ABIs below are x86_64's"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
SIGSYS = int(signal.SIGSYS)
NO_FILTER = -1  # BPF_FD for cave-exec: drop capabilities, set no_new_privs, install nothing
# The interpreter running the tests, by path: `python3` on PATH may be a shell shim (pyenv).
PYTHON = sys.executable


@dataclass(frozen=True)
class CaveExec:
    """The built helper and a memfd holding the compiled policy, as the zygote hands them over."""

    helper: Path
    policy_fd: int

    def run(
        self, argv: list[str], *, filtered: bool = True, isolated: bool = False, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        bpf_fd = self.policy_fd if filtered else NO_FILTER
        env_fd = environment_memfd(DEFAULT_ENV)
        mode = "1" if isolated else "0"
        try:
            return subprocess.run(
                [str(self.helper), mode, str(bpf_fd), str(env_fd), "/tmp", "--", *argv],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                pass_fds=(env_fd, bpf_fd) if filtered else (env_fd,),
                env={},
            )
        finally:
            os.close(env_fd)

    def python(
        self, code: str, *argv: str, filtered: bool = True, isolated: bool = False, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            [PYTHON, "-c", _PRELUDE + code, *argv],
            filtered=filtered,
            isolated=isolated,
            stdin=stdin,
        )


@pytest.fixture(scope="module")
def cave_exec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaveExec]:
    if os.geteuid() != 0:
        pytest.fail("cave-exec needs root here: dropping the bounding set takes CAP_SETPCAP")
    helper = ensure_exec_helper(tmp_path_factory.mktemp("cave-state"))
    policy_fd = os.memfd_create("cave-seccomp-test")  # close-on-exec; pass_fds hands it over
    try:
        os.write(policy_fd, seccomp_policy.compile_policy())
        yield CaveExec(helper, policy_fd)
    finally:
        os.close(policy_fd)


# Every probe starts with this; it needs nothing outside the standard library.
_PRELUDE = """
import ctypes, fcntl, json, os, sys, termios

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a % 2**64) for a in args])
    return ret, ctypes.get_errno()
"""

# One probe per run does every case, each in its own fork, so that a call that went through
# (a namespace, a tracer, a personality) cannot change the next one; the fork's exit closes any
# fd the call returned. "PTY" is the probe's controlling terminal (cave-exec made it a session
# leader), "BUF" a zeroed 256-byte buffer (empty strings, zeroed structs).
_BATCH = """
os.setsid()  # cave-exec leaves a degraded (ISOLATED=0) command in its group: lead a session here
pty_master, pty = os.openpty()
fcntl.ioctl(pty, termios.TIOCSCTTY, 0)
buf = ctypes.create_string_buffer(256)
tokens = {"PTY": pty, "BUF": ctypes.addressof(buf)}
results = {}
for name, nr, args in json.load(sys.stdin):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        me = os.getpid()
        ret, err = call(nr, *[tokens.get(a, a) for a in args])
        if os.getpid() == me:  # a clone that went through returns here twice
            os.write(w, json.dumps([ret, err]).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 4096)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    results[name] = json.loads(out) if out else ["signal", os.WTERMSIG(status)]
print(json.dumps(results))
"""

CLONE_NEWUSER = 0x10000000
_SIGCHLD = int(signal.SIGCHLD)
_ALL_ONES = (-1,) * 6  # every fd, pointer, length and flag invalid

# name -> (syscall, args, expected errno under the filter)
HOSTILE_CASES: dict[str, tuple[str, tuple[int | str, ...], int]] = {
    "ptrace_traceme": ("ptrace", (0, 0, 0, 0), errno.EPERM),
    "mount": ("mount", ("BUF", "BUF", "BUF", 0, 0), errno.EPERM),
    "umount2": ("umount2", ("BUF", 0), errno.EPERM),
    "pivot_root": ("pivot_root", ("BUF", "BUF"), errno.EPERM),
    "unshare_newuser": ("unshare", (CLONE_NEWUSER,), errno.EPERM),
    "setns": ("setns", (-1, 0), errno.EPERM),
    "keyctl_get_keyring_id": ("keyctl", (0, -3, 1), errno.EPERM),  # KEY_SPEC_SESSION_KEYRING
    "add_key": ("add_key", ("BUF", "BUF", 0, 0, -3), errno.EPERM),
    "bpf_map_create": ("bpf", (0, "BUF", 72), errno.EPERM),
    "perf_event_open": ("perf_event_open", ("BUF", 0, -1, -1, 0), errno.EPERM),
    "io_uring_setup": ("io_uring_setup", (1, "BUF"), errno.EPERM),
    "userfaultfd_user_mode": ("userfaultfd", (1,), errno.EPERM),
    "reboot_bad_magic": ("reboot", (0, 0, 0, 0), errno.EPERM),
    "swapon": ("swapon", ("BUF", 0), errno.EPERM),
    "init_module": ("init_module", ("BUF", 0, "BUF"), errno.EPERM),
    "kexec_load_bad_flags": ("kexec_load", (0, 0, 0, -1), errno.EPERM),
    "clone3": ("clone3", (0, 0), errno.ENOSYS),
    **{
        f"clone_{name.lower()}": ("clone", (flag | _SIGCHLD, 0, 0, 0, 0), errno.EPERM)
        for name, flag in seccomp_policy.CLONE_NAMESPACE_FLAGS
    },
    "socket_netlink": ("socket", (seccomp_policy.AF_NETLINK, 3, 0), errno.EPERM),
    "socket_vsock": ("socket", (seccomp_policy.AF_VSOCK, 1, 0), errno.EPERM),
    "socket_packet": ("socket", (17, 3, 0), errno.EPERM),  # AF_PACKET, SOCK_RAW
    "socket_alg": ("socket", (38, 5, 0), errno.EPERM),  # AF_ALG: the kernel crypto API
    "socket_unix_high_bits_family_7": ("socket", (2**32 + 7, 1, 0), errno.EPERM),
    "socket_netlink_high_bits": ("socket", (2**32 + seccomp_policy.AF_NETLINK, 3, 0), errno.EPERM),
    "ioctl_tiocsti": ("ioctl", ("PTY", seccomp_policy.TIOCSTI, "BUF"), errno.EPERM),
    "ioctl_tiocsti_high_bits": (
        "ioctl",
        ("PTY", 2**32 + seccomp_policy.TIOCSTI, "BUF"),
        errno.EPERM,
    ),
    "ioctl_tioclinux": ("ioctl", ("PTY", seccomp_policy.TIOCLINUX, "BUF"), errno.EPERM),
    "personality_linux32": ("personality", (0x0008,), errno.EPERM),
    "personality_read_implies_exec": ("personality", (0x0400000,), errno.EPERM),
    "personality_no_randomize": ("personality", (0x0040000,), errno.EPERM),
    "personality_high_bits": ("personality", (2**32 + 0x0400000,), errno.EPERM),
}

# Hostile cases that need no capability: with capabilities dropped and no filter they go through.
# Run unfiltered as root on the host, each must stay harmless: it happens in a fork that exits
# at once (a tracer that is the probe, a user namespace or keyring of that fork, an io_uring of one
# entry, a userfaultfd, a netlink or vsock socket closed unused, a NUL byte pushed into the
# probe's own pty, a personality of that fork).
FILTER_ONLY_CASES = (
    "ptrace_traceme",
    "unshare_newuser",
    "clone_clone_newuser",
    "keyctl_get_keyring_id",
    "io_uring_setup",
    "userfaultfd_user_mode",
    "socket_netlink",
    "socket_netlink_high_bits",
    "socket_vsock",
    "ioctl_tiocsti",
    "ioctl_tiocsti_high_bits",
    "personality_linux32",
    "personality_read_implies_exec",
    "personality_no_randomize",
    "personality_high_bits",
)

# name -> (syscall, args): must still succeed (non-negative result) under the filter.
ALLOWED_CASES: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "socket_inet": ("socket", (2, 1, 0)),
    "socket_inet6": ("socket", (10, 2, 0)),
    "socket_unix": ("socket", (1, 1, 0)),
    "socket_inet_high_bits": ("socket", (2**32 + 2, 1, 0)),
    "ioctl_fionread": ("ioctl", ("PTY", 0x541B, "BUF")),
    "ioctl_tiocgwinsz": ("ioctl", ("PTY", 0x5413, "BUF")),
    "personality_linux": ("personality", (0,)),
    "personality_query": ("personality", (0xFFFFFFFF,)),
    "getpid": ("getpid", ()),
}


def _nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


_ALLOWED = set(seccomp_policy.allowed_names())
_ARG_CHECKED = {rule.syscall for rule in seccomp_policy.ARG_RULES}
_ENOSYS = {name for name, _ in seccomp_policy.ENOSYS_SYSCALLS}
# Every syscall this libseccomp knows and the allowlist leaves out, with all-ones arguments: the
# default refuses each with EPERM. Numbers past the known table get ENOSYS.
SWEEP_CASES = {
    f"sweep_{name}": (name, _ALL_ONES, errno.ENOSYS if name in _ENOSYS else errno.EPERM)
    for name in seccomp_policy.known_syscalls().values()
    if name not in _ALLOWED and name not in _ARG_CHECKED
}
_KNOWN_MAX = max(seccomp_policy.known_syscalls())
UNKNOWN_NUMBERS = (_KNOWN_MAX + 1, _KNOWN_MAX + 7, 999, 1023)
_X32_GETPID = ["x32_getpid", 0x40000000 | 39, []]


def _run_batch(
    cave_exec: CaveExec, cases: dict[str, tuple[Any, ...]], *, filtered: bool
) -> dict[str, list[Any]]:
    payload = [[name, _nr(case[0]), list(case[1])] for name, case in cases.items()]
    if filtered:
        payload.append(_X32_GETPID)
        payload += [[f"unknown_{nr}", nr, list(_ALL_ONES)] for nr in UNKNOWN_NUMBERS]
    done = cave_exec.python(_BATCH, filtered=filtered, stdin=json.dumps(payload))
    assert done.returncode == 0, done.stderr
    results: dict[str, list[Any]] = json.loads(done.stdout)
    return results


@pytest.fixture(scope="module")
def filtered(cave_exec: CaveExec) -> dict[str, list[Any]]:
    return _run_batch(cave_exec, {**HOSTILE_CASES, **SWEEP_CASES, **ALLOWED_CASES}, filtered=True)


@pytest.fixture(scope="module")
def unfiltered(cave_exec: CaveExec) -> dict[str, list[Any]]:
    # Only the harmless FILTER_ONLY_CASES: the rest is not needed to make the point.
    cases = {name: HOSTILE_CASES[name] for name in FILTER_ONLY_CASES}
    return _run_batch(cave_exec, cases, filtered=False)


@pytest.mark.parametrize("name", [*HOSTILE_CASES, *SWEEP_CASES])
def test_hostile_call_is_refused(name: str, filtered: dict[str, list[Any]]) -> None:
    expected = {**HOSTILE_CASES, **SWEEP_CASES}[name][2]
    assert filtered[name] == [-1, expected]


@pytest.mark.parametrize("name", FILTER_ONLY_CASES)
def test_only_the_filter_stops_it(
    name: str, filtered: dict[str, list[Any]], unfiltered: dict[str, list[Any]]
) -> None:
    ret, err = unfiltered[name]
    if ret < 0:  # e.g. no vsock driver, io_uring disabled, legacy TIOCSTI off, userns restricted
        pytest.skip(f"this host refuses it without the filter too: {errno.errorcode[err]}")
    assert filtered[name] == [-1, errno.EPERM]


@pytest.mark.parametrize("name", ALLOWED_CASES)
def test_allowed_call_still_works(name: str, filtered: dict[str, list[Any]]) -> None:
    ret, err = filtered[name]
    assert ret >= 0, os.strerror(err)


def test_every_known_syscall_off_the_allowlist_is_refused() -> None:
    notable = {name for name, _ in seccomp_policy.NOTABLE_REFUSALS}
    assert notable <= {case[0] for case in SWEEP_CASES.values()}  # each is really swept
    assert len(SWEEP_CASES) > 50


@pytest.mark.parametrize("number", UNKNOWN_NUMBERS)
def test_unknown_syscall_numbers_get_enosys(number: int, filtered: dict[str, list[Any]]) -> None:
    assert filtered[f"unknown_{number}"] == [-1, errno.ENOSYS]


def test_x32_syscall_kills_the_process(filtered: dict[str, list[Any]]) -> None:
    assert filtered["x32_getpid"] == ["signal", SIGSYS]


_INT80_GETPID = """
import mmap
code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write(bytes.fromhex("b814000000cd80c3"))  # mov eax, 20 (i386 getpid); int 0x80; ret
getpid_i386 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
print(getpid_i386() == os.getpid())
"""


def test_i386_syscall_through_int80_kills_the_process(cave_exec: CaveExec) -> None:
    control = cave_exec.python(_INT80_GETPID, filtered=False)
    if control.stdout.strip() != "True":
        pytest.skip(f"no i386 emulation in this kernel (rc {control.returncode})")
    # cave-exec exits with 128 + the signal that ended the command.
    assert cave_exec.python(_INT80_GETPID).returncode == 128 + SIGSYS


_STATUS_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
_ZERO_CAPS = "0000000000000000"
_EXPECTED_STATUS = {
    **{f: _ZERO_CAPS for f in _STATUS_FIELDS[:5]},
    "NoNewPrivs": "1",
    "Seccomp": "2",
}
_PRINT_STATUS = "print(open('/proc/self/status').read())"


def _status_fields(text: str) -> dict[str, str]:
    pairs = (line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {key: value.strip() for key, value in pairs if key in _STATUS_FIELDS}


def test_exec_program_has_no_capabilities_nnp_and_the_filter(cave_exec: CaveExec) -> None:
    done = cave_exec.python(_PRINT_STATUS)
    assert done.returncode == 0, done.stderr
    assert _status_fields(done.stdout) == _EXPECTED_STATUS


def test_without_the_filter_only_the_filter_is_missing(cave_exec: CaveExec) -> None:
    done = cave_exec.python(_PRINT_STATUS, filtered=False)
    assert done.returncode == 0, done.stderr
    assert _status_fields(done.stdout) == {**_EXPECTED_STATUS, "Seccomp": "0"}


def test_root_gets_no_capabilities_back_through_execve(cave_exec: CaveExec) -> None:
    done = cave_exec.python("os.execv('/bin/cat', ['cat', '/proc/self/status'])")
    assert done.returncode == 0, done.stderr
    assert _status_fields(done.stdout) == _EXPECTED_STATUS


_IN_PID_NAMESPACE = """
print(json.dumps([os.getpid(), call(UNSHARE, CLONE_NEWUSER), open('/proc/self/status').read()]))
"""


def test_the_filter_holds_in_a_pid_namespace(cave_exec: CaveExec) -> None:
    code = f"UNSHARE, CLONE_NEWUSER = {_nr('unshare')}, {CLONE_NEWUSER}\n" + _IN_PID_NAMESPACE
    done = cave_exec.python(code, isolated=True)
    assert done.returncode == 0, done.stderr
    pid, unshare_result, status = json.loads(done.stdout)
    assert pid == 2  # pid 1 is cave-exec's init of the new namespace
    assert unshare_result == [-1, errno.EPERM]
    assert _status_fields(status) == _EXPECTED_STATUS


_NORMAL_WORK = (
    'echo ok; ls / >/dev/null; python3 -c "import json, subprocess;'
    ' subprocess.run([\\"true\\"], check=True); print(\\"python ok\\")"'
)


def test_shell_forks_execs_and_runs_python(cave_exec: CaveExec) -> None:
    done = cave_exec.run(["/bin/sh", "-c", _NORMAL_WORK])
    assert (done.returncode, done.stdout) == (0, "ok\npython ok\n"), done.stderr


def test_threads_and_subprocesses_work(cave_exec: CaveExec) -> None:
    done = cave_exec.python(
        "import subprocess, threading\n"
        "seen = []\n"
        "thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))\n"
        "thread.start(); thread.join()\n"
        "child = subprocess.run(['/bin/echo', 'child ok'], capture_output=True, text=True)\n"
        "print(seen[0] != threading.get_native_id(), child.stdout.strip())\n"
    )
    assert (done.returncode, done.stdout) == (0, "True child ok\n"), done.stderr


def test_compile_policy_is_one_cached_bpf_program() -> None:
    program = seccomp_policy.compile_policy()
    assert program is seccomp_policy.compile_policy()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096


def test_an_allowlisted_name_that_does_not_resolve_refuses_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bogus = (*seccomp_policy.ALLOWED_SYSCALLS, "no_such_syscall")
    monkeypatch.setattr(seccomp_policy, "ALLOWED_SYSCALLS", bogus)
    with pytest.raises(IsolationUnavailableError, match="no_such_syscall unknown to libseccomp"):
        seccomp_policy.compile_policy.__wrapped__()


def test_a_program_the_kernel_rejects_refuses_the_policy() -> None:
    jump_out_of_range = bytes.fromhex("05 00 00 00 ff 00 00 00")  # BPF_JA past the end
    with pytest.raises(IsolationUnavailableError, match="does not load as built"):
        seccomp_policy._check_it_loads(jump_out_of_range)


def test_a_program_that_allows_everything_refuses_the_policy() -> None:
    allow_all = bytes.fromhex("06 00 00 00 00 00 ff 7f")  # BPF_RET SECCOMP_RET_ALLOW
    with pytest.raises(IsolationUnavailableError, match="does not load as built"):
        seccomp_policy._check_it_loads(allow_all)


def test_every_allowlisted_name_resolves_on_x86_64_and_aarch64() -> None:
    for machine, arch in (("x86_64", pyseccomp.Arch.X86_64), ("aarch64", pyseccomp.Arch.AARCH64)):
        missing = [
            name
            for name in seccomp_policy.allowed_names(machine)
            if int(pyseccomp.resolve_syscall(arch, name)) < 0
        ]
        assert missing == [], machine


def test_complement_cubes_cover_exactly_the_other_words() -> None:
    values = (0x5412, 0x541C)
    cubes = list(seccomp_policy.complement_cubes(values, width=16))
    for word in range(1 << 16):
        hits = sum((word & mask) == value for mask, value in cubes)
        assert hits == (0 if word in values else 1), hex(word)


def test_docs_carry_the_current_policy_table() -> None:
    docs = (REPO_ROOT / "docs" / "seccomp.md").read_text(encoding="utf-8")
    assert seccomp_policy.policy_table() in docs


# What a user runs first in a sandbox: each must work under the allowlist, in a real sandbox.
EVERYDAY_TOOLS = {
    "python3": "python3 -c 'import json, sqlite3, ssl, subprocess, threading; print(\"py ok\")'",
    "gcc": (
        "cd /tmp && printf '#include <stdio.h>\\nint main(void){puts(\"c ok\");return 0;}\\n'"
        " > t.c && gcc -O2 -o t t.c && ./t"
    ),
    "node": (
        "node -e \"const fs=require('fs'); fs.writeFileSync('/tmp/n.txt','x');"
        " require('child_process').execSync('true');"
        " console.log('node ok', fs.readFileSync('/tmp/n.txt', 'utf8'))\""
    ),
    "git": (
        "cd /tmp && git init -q r && cd r && echo x > f && git add f"
        " && git -c user.name=t -c user.email=t@example.com commit -q -m first"
        " && git log --format=%s"
    ),
    "pip": (
        "pip --version >/dev/null && python3 -m venv /tmp/v && /tmp/v/bin/pip --version | cut -c1-4"
    ),
}
EVERYDAY_OUTPUT = {
    "python3": b"py ok\n",
    "gcc": b"c ok\n",
    "node": b"node ok x\n",
    "git": b"first\n",
    "pip": b"pip \n",
}


@pytest.mark.parametrize("tool", EVERYDAY_TOOLS)
@async_test
async def test_everyday_tools_work_in_a_sandbox(backend: Backend, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed on this host; the sandbox borrows the host's /usr")
    limits = LIMITS.model_copy(update={"disk_mb": 256, "memory_mb": 512, "timeout_s": 120})
    async with open_sandbox(backend, limits) as sandbox:
        out, err, result = await run(sandbox, EVERYDAY_TOOLS[tool])
        status, _, _ = await run(sandbox, ["grep", "Seccomp:", "/proc/self/status"])
    assert (result.exit_code, out) == (0, EVERYDAY_OUTPUT[tool]), err.decode(errors="replace")
    assert status == b"Seccomp:\t2\n"
