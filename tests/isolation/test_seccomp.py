"""Hostile programs against the hardened exec path: refused syscalls, foreign ABIs, normal work."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from actors.isolation import seccomp_policy

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="syscall arguments and foreign ABIs below are x86_64's"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
SIGSYS = int(signal.SIGSYS)

# Every child runs this first. Modes: "hardened" is what the zygote's child does before execve;
# "filter" installs the filter alone and keeps root's capabilities, so an EPERM there can only
# come from seccomp (the arguments below make the unfiltered call fail otherwise, or succeed).
_PRELUDE = """
import ctypes, fcntl, json, os, sys, termios
from actors.isolation import privileges, seccomp_policy

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a % 2**64) for a in args])
    return ret, ctypes.get_errno()

def harden(mode):
    program = seccomp_policy.compile_policy()
    if mode == "hardened":
        privileges.harden_child(program)
    elif mode == "filter":
        privileges.set_no_new_privs()
        seccomp_policy.install(program)
"""

# One child per mode runs every case, each in its own fork so that a call that went through
# (a namespace, a tracer) cannot change the next one. "PTY" is the child's controlling
# terminal, "BUF" a zeroed 256-byte buffer (empty strings, zeroed structs).
_BATCH = """
pty_master, pty = os.openpty()
fcntl.ioctl(pty, termios.TIOCSCTTY, 0)
buf = ctypes.create_string_buffer(256)
tokens = {"PTY": pty, "BUF": ctypes.addressof(buf)}
cases = json.load(sys.stdin)
harden(sys.argv[1])
results = {}
for name, nr, args in cases:
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

# name -> (syscall, args, expected errno after hardening)
HOSTILE_CASES: dict[str, tuple[str, tuple[int | str, ...], int]] = {
    "ptrace_traceme": ("ptrace", (0, 0, 0, 0), errno.EPERM),
    "mount": ("mount", ("BUF", "BUF", "BUF", 0, 0), errno.EPERM),
    "umount2": ("umount2", ("BUF", 0), errno.EPERM),
    "pivot_root": ("pivot_root", ("BUF", "BUF"), errno.EPERM),
    "unshare_newuser": ("unshare", (CLONE_NEWUSER,), errno.EPERM),
    "setns": ("setns", (-1, 0), errno.EPERM),
    "keyctl_session_keyring": ("keyctl", (0, -3, 1), errno.EPERM),
    "add_key": ("add_key", ("BUF", "BUF", 0, 0, -3), errno.EPERM),
    "bpf_map_create": ("bpf", (0, "BUF", 72), errno.EPERM),
    "perf_event_open": ("perf_event_open", ("BUF", 0, -1, -1, 0), errno.EPERM),
    "io_uring_setup": ("io_uring_setup", (8, "BUF"), errno.EPERM),
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

# name -> (syscall, args): must still succeed (non-negative result) after hardening.
ALLOWED_CASES: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "socket_inet": ("socket", (2, 1, 0)),
    "socket_inet6": ("socket", (10, 2, 0)),
    "socket_unix": ("socket", (1, 1, 0)),
    "ioctl_tiocgwinsz": ("ioctl", ("PTY", 0x5413, "BUF")),
    "personality_linux": ("personality", (0,)),
    "personality_query": ("personality", (0xFFFFFFFF,)),
    "getpid": ("getpid", ()),
}


def _nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


# Every name the policy refuses outright (and this libseccomp knows), with all-ones arguments.
SWEEP_CASES = {
    f"sweep_{name}": (name, _ALL_ONES, errno_value)
    for names, errno_value in (
        (seccomp_policy.DENIED_SYSCALLS, errno.EPERM),
        (seccomp_policy.ENOSYS_SYSCALLS, errno.ENOSYS),
    )
    for name, _ in names
    if _nr(name) >= 0
}


def _run_python(code: str, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PRELUDE + code, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        start_new_session=True,  # the zygote's caller does setsid; and the pty becomes the ctty
    )


def _run_batch(mode: str, cases: dict[str, tuple[Any, ...]]) -> dict[str, list[int | str]]:
    payload = [[name, _nr(case[0]), list(case[1])] for name, case in cases.items()]
    payload.append(["x32_getpid", 0x40000000 | 39, []])
    done = _run_python(_BATCH, mode, stdin=json.dumps(payload))
    assert done.returncode == 0, done.stderr
    results: dict[str, list[int | str]] = json.loads(done.stdout)
    return results


@pytest.fixture(scope="module")
def hardened() -> dict[str, list[int | str]]:
    return _run_batch("hardened", {**HOSTILE_CASES, **SWEEP_CASES, **ALLOWED_CASES})


@pytest.fixture(scope="module")
def filter_only() -> dict[str, list[int | str]]:
    return _run_batch("filter", {**HOSTILE_CASES, **SWEEP_CASES, **ALLOWED_CASES})


@pytest.mark.parametrize("name", [*HOSTILE_CASES, *SWEEP_CASES])
def test_hostile_call_fails_after_hardening(name: str, hardened: dict[str, list[Any]]) -> None:
    expected = {**HOSTILE_CASES, **SWEEP_CASES}[name][2]
    assert hardened[name] == [-1, expected]


@pytest.mark.parametrize("name", [*HOSTILE_CASES, *SWEEP_CASES])
def test_the_filter_alone_refuses_it(name: str, filter_only: dict[str, list[Any]]) -> None:
    expected = {**HOSTILE_CASES, **SWEEP_CASES}[name][2]
    assert filter_only[name] == [-1, expected]


@pytest.mark.parametrize("name", ALLOWED_CASES)
def test_allowed_call_still_works(name: str, hardened: dict[str, list[Any]]) -> None:
    ret, err = hardened[name]
    assert ret >= 0, os.strerror(err)


def test_x32_syscall_kills_the_process(
    hardened: dict[str, list[Any]], filter_only: dict[str, list[Any]]
) -> None:
    assert hardened["x32_getpid"] == filter_only["x32_getpid"] == ["signal", SIGSYS]


_INT80_GETPID = """
import mmap
code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write(bytes.fromhex("b814000000cd80c3"))  # mov eax, 20 (i386 getpid); int 0x80; ret
getpid_i386 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
harden(sys.argv[1])
print(getpid_i386() == os.getpid())
"""


def test_i386_syscall_through_int80_kills_the_process() -> None:
    control = _run_python(_INT80_GETPID, "none")
    if control.stdout.strip() != "True":
        pytest.skip(f"no i386 emulation in this kernel (rc {control.returncode})")
    assert _run_python(_INT80_GETPID, "hardened").returncode == -SIGSYS


_STATUS_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
_ZERO_CAPS = "0000000000000000"
_EXPECTED_STATUS = {
    **{f: _ZERO_CAPS for f in _STATUS_FIELDS[:5]},
    "NoNewPrivs": "1",
    "Seccomp": "2",
}


def _status_fields(text: str) -> dict[str, str]:
    pairs = (line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return {key: value.strip() for key, value in pairs if key in _STATUS_FIELDS}


def test_status_after_hardening_shows_no_capabilities_nnp_and_filter() -> None:
    done = _run_python("harden('hardened')\nprint(open('/proc/self/status').read())")
    assert done.returncode == 0, done.stderr
    assert _status_fields(done.stdout) == _EXPECTED_STATUS


def test_root_gets_no_capabilities_back_through_execve() -> None:
    exec_cat = "harden('hardened')\nos.execv('/bin/cat', ['cat', '/proc/self/status'])"
    done = _run_python(exec_cat)
    assert done.returncode == 0, done.stderr
    assert _status_fields(done.stdout) == _EXPECTED_STATUS


_NORMAL_WORK = (
    'echo ok; ls / >/dev/null; python3 -c "import json, subprocess;'
    ' subprocess.run([\\"true\\"], check=True); print(\\"python ok\\")"'
)


def test_shell_forks_execs_and_runs_python_after_hardening() -> None:
    done = _run_python(
        "harden('hardened')\nos.execv('/bin/sh', ['sh', '-c', sys.argv[1]])", _NORMAL_WORK
    )
    assert (done.returncode, done.stdout) == (0, "ok\npython ok\n"), done.stderr


def test_threads_and_subprocesses_work_after_hardening() -> None:
    done = _run_python(
        "import subprocess, threading\n"
        "harden('hardened')\n"
        "seen = []\n"
        "thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))\n"
        "thread.start(); thread.join()\n"
        "child = subprocess.run(['/bin/echo', 'child ok'], capture_output=True, text=True)\n"
        "print(seen[0] != threading.get_native_id(), child.stdout.strip())\n"
    )
    assert (done.returncode, done.stdout) == (0, "True child ok\n"), done.stderr


_INSTALL_ERROR = """
from cave.errors import IsolationUnavailableError
program = bytes.fromhex(sys.argv[1])
if sys.argv[2] == "nnp":
    privileges.set_no_new_privs()
else:
    privileges.drop_all_capabilities()  # neither no_new_privs nor CAP_SYS_ADMIN
try:
    seccomp_policy.install(program)
except IsolationUnavailableError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("program", "setup", "message"),
    [
        (b"", "nnp", "not 1..4096 instructions"),
        (b"\x06\x00\x00\x00\x00\x00\xff", "nnp", "not 1..4096 instructions"),
        (bytes(8), "nnp", "EINVAL"),  # "ld #0" with no return: the kernel's checker refuses it
        (b"\x06\x00\x00\x00\x00\x00\xff\x7f", "caps", "EACCES"),  # "ret ALLOW", but no nnp
    ],
)
def test_install_refusal_is_an_isolation_error(program: bytes, setup: str, message: str) -> None:
    done = _run_python(_INSTALL_ERROR, program.hex(), setup)
    assert done.returncode == 0, done.stderr
    assert message in done.stdout


def test_compile_policy_is_one_cached_bpf_program() -> None:
    program = seccomp_policy.compile_policy()
    assert program is seccomp_policy.compile_policy()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096


def test_unknown_syscall_names_are_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bogus = (*seccomp_policy.DENIED_SYSCALLS, ("no_such_syscall", "test"))
    monkeypatch.setattr(seccomp_policy, "DENIED_SYSCALLS", bogus)
    with caplog.at_level(logging.DEBUG, logger=seccomp_policy.__name__):
        program = seccomp_policy.compile_policy.__wrapped__()
    assert program == seccomp_policy.compile_policy()
    assert "no_such_syscall" in caplog.text


def test_docs_carry_the_current_policy_table() -> None:
    docs = (REPO_ROOT / "docs" / "seccomp.md").read_text(encoding="utf-8")
    assert seccomp_policy.policy_table() in docs
