"""The sandbox's seccomp allowlist, compiled once to classic BPF; cave-exec installs it per command.

Default deny (see `docs/seccomp.md` for the full policy, `policy_table()` renders it):

| What                                                      | Action        |
|-----------------------------------------------------------|---------------|
| every name in `ALLOWED_SYSCALLS` (+ this arch's extras)   | ALLOW         |
| `clone` without a CLONE_NEW* flag in arg0                 | ALLOW         |
| `socket` of AF_UNIX, AF_INET, AF_INET6                    | ALLOW         |
| `ioctl` other than TIOCSTI and TIOCLINUX                  | ALLOW         |
| `personality` 0 (PER_LINUX) and 0xffffffff (query)        | ALLOW         |
| `clone3` (flags live in memory BPF can't read)            | ERRNO(ENOSYS) |
| any other syscall this libseccomp knows                   | ERRNO(EPERM)  |
| a number it does not know (newer than its table, gaps)    | ERRNO(ENOSYS) |
| a foreign architecture (i386 `int 0x80`, x32)             | KILL_PROCESS  |

ENOSYS for the unknown is what lets a newer libc fall back gracefully (glibc, musl, Go and Rust
runtimes treat ENOSYS as "this kernel lacks it"; EPERM would make them fail). `compile_policy()`
refuses to return a policy whose allowlist does not resolve on this architecture, and loads the
result once in a throw-away process to check that the kernel accepts it and that it says what this
table says. The launcher puts the bytes in a memfd and `cave-exec` attaches them right before
`execvp`, after dropping every capability and setting no_new_privs.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyseccomp

from cave.errors import IsolationUnavailableError

_log = logging.getLogger(__name__)

# What ordinary programs need (Python, gcc, node, git, pip, a shell, coreutils), named as in the
# generic syscall table that x86_64 and aarch64 share. Based on Docker's default profile, less what
# the refusals below take out. Every name must resolve on a supported architecture.
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # files and directories
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "openat", "openat2", "close", "close_range", "lseek", "newfstatat", "fstat",
    "statx", "statfs", "fstatfs", "faccessat", "faccessat2", "getdents64", "getcwd", "chdir",
    "fchdir", "mkdirat", "mknodat", "unlinkat", "renameat", "renameat2", "linkat", "symlinkat",
    "readlinkat", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchownat", "umask", "truncate",
    "ftruncate", "fallocate", "fadvise64", "readahead", "fsync", "fdatasync", "sync", "syncfs",
    "sync_file_range", "flock", "fcntl", "dup", "dup3", "utimensat", "copy_file_range",
    "sendfile", "splice", "tee", "vmsplice", "getxattr", "lgetxattr", "fgetxattr", "setxattr",
    "lsetxattr", "fsetxattr", "listxattr", "llistxattr", "flistxattr", "removexattr",
    "lremovexattr", "fremovexattr", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    "memfd_create", "cachestat",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "msync", "madvise", "mincore", "mlock",
    "mlock2", "munlock", "mlockall", "munlockall", "remap_file_pages", "membarrier",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "map_shadow_stack",
    # processes, threads, signals
    "execve", "execveat", "exit", "exit_group", "wait4", "waitid", "kill", "tkill", "tgkill",
    "set_tid_address", "set_robust_list", "get_robust_list", "futex", "futex_waitv",
    "futex_wake", "futex_wait", "futex_requeue", "rseq", "restart_syscall", "rt_sigaction",
    "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "pidfd_open", "pidfd_send_signal",
    "process_mrelease", "getpid", "getppid", "gettid", "getpgid", "setpgid", "getsid", "setsid",
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "setuid",
    "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid",
    "setfsgid", "capget", "capset", "prctl", "seccomp", "landlock_create_ruleset",
    "landlock_add_rule", "landlock_restrict_self", "getrlimit", "setrlimit", "prlimit64",
    "getrusage", "getpriority", "setpriority", "ioprio_get", "ioprio_set", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_setparam",
    "sched_getscheduler", "sched_setscheduler", "sched_getattr", "sched_setattr",
    "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "getcpu",
    # time
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "times",
    "getitimer", "setitimer", "timer_create", "timer_settime", "timer_gettime",
    "timer_getoverrun", "timer_delete", "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # events and polling
    "ppoll", "pselect6", "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2",
    "eventfd2", "signalfd4", "pipe2",
    # sockets (`socket` itself is argument-checked below)
    "socketpair", "bind", "connect", "listen", "accept", "accept4", "getsockname",
    "getpeername", "setsockopt", "getsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg",
    "sendmmsg", "recvmmsg", "shutdown",
    # System V and POSIX IPC (the sandbox has an ipc namespace of its own)
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget",
    "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive",
    "mq_notify", "mq_getsetattr",
    # asynchronous I/O (not io_uring) and system information
    "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    "getrandom", "uname", "sysinfo",
)  # fmt: skip

# The pre-generic names each architecture still has (x86_64's open, stat, fork, ...).
ARCH_ALLOWED_SYSCALLS: dict[str, tuple[str, ...]] = {
    "x86_64": (
        "open",
        "creat",
        "stat",
        "lstat",
        "access",
        "getdents",
        "mkdir",
        "rmdir",
        "unlink",
        "rename",
        "link",
        "symlink",
        "readlink",
        "chmod",
        "chown",
        "lchown",
        "mknod",
        "utime",
        "utimes",
        "futimesat",
        "dup2",
        "pipe",
        "poll",
        "select",
        "epoll_create",
        "epoll_wait",
        "eventfd",
        "signalfd",
        "inotify_init",
        "fork",
        "vfork",
        "pause",
        "alarm",
        "time",
        "getpgrp",
        "arch_prctl",
        "set_thread_area",
        "get_thread_area",
    ),  # fmt: skip
    "aarch64": (),
}

ENOSYS_SYSCALLS: tuple[tuple[str, str], ...] = (
    (
        "clone3",
        "its flags sit in a struct in memory that seccomp cannot read; ENOSYS makes libc fall"
        " back to clone, where the namespace-flag rules apply (what Docker and runc do)",
    ),
)

# Refused by the default action anyway; named here with the reason, and checked to be refused.
NOTABLE_REFUSALS: tuple[tuple[str, str], ...] = (
    ("ptrace", "read or rewrite another process's memory and registers"),
    ("process_vm_readv", "read another process's memory"),
    ("process_vm_writev", "write another process's memory"),
    ("mount", "change the mount table (escape or hide files)"),
    ("umount2", "remove mounts that hide host paths"),
    ("pivot_root", "swap the root file system"),
    ("chroot", "change root; with an fd kept open it is a classic escape"),
    ("unshare", "new namespaces: a user namespace regains every capability"),
    ("setns", "join another namespace through an inherited fd"),
    ("keyctl", "kernel keyrings are not namespaced: read or plant host keys"),
    ("add_key", "kernel keyrings are not namespaced"),
    ("request_key", "kernel keyrings are not namespaced; may upcall to host helpers"),
    ("bpf", "eBPF programs and maps: large kernel attack surface"),
    ("perf_event_open", "performance counters: side channels, kernel attack surface"),
    ("io_uring_setup", "io_uring: runs syscalls the filter never sees; many kernel CVEs"),
    ("userfaultfd", "stall the kernel on a page fault at will: exploit primitive"),
    ("open_by_handle_at", "open files by handle, bypassing the mount view (shocker escape)"),
    ("fanotify_init", "filesystem-wide notification: not needed, and a per-user budget"),
    ("fsopen", "new mount API (also fsconfig, fsmount, fspick, move_mount, open_tree)"),
    ("kexec_load", "load a new kernel (also kexec_file_load, init_module, finit_module)"),
    ("kcmp", "compare another process's kernel objects: a probe for exploits"),
    ("pidfd_getfd", "take a file descriptor out of another process"),
    ("set_mempolicy", "NUMA placement of host memory (also mbind, migrate_pages, move_pages)"),
    ("settimeofday", "set the host clock (also clock_settime, clock_adjtime, adjtimex)"),
    ("syslog", "read or clear the kernel log (leaks addresses)"),
    ("sethostname", "the hostname is set once, at start"),
    ("reboot", "restart or halt the machine (also swapon, swapoff, acct, quotactl)"),
    ("iopl", "raw I/O port access (also ioperm)"),
    ("vhangup", "hang up the terminal under every process that shares it"),
)


@dataclass(frozen=True)
class ArgRule:
    """`action` for `syscall` when `(argument[arg] & mask) == value`."""

    syscall: str
    arg: int
    mask: int
    value: int
    why: str
    errno_value: int | None = errno.EPERM  # None: ALLOW


CLONE_NAMESPACE_FLAGS: tuple[tuple[str, int], ...] = (
    ("CLONE_NEWUSER", 0x10000000),
    ("CLONE_NEWNS", 0x00020000),
    ("CLONE_NEWPID", 0x20000000),
    ("CLONE_NEWNET", 0x40000000),
    ("CLONE_NEWIPC", 0x08000000),
    ("CLONE_NEWUTS", 0x04000000),
    ("CLONE_NEWCGROUP", 0x02000000),
)
_CLONE_NAMESPACES = functools.reduce(int.__or__, (flag for _, flag in CLONE_NAMESPACE_FLAGS))
# The kernel reads these arguments as 32-bit ints, so the mask ignores the upper half of the
# register: `ioctl(fd, 0x1_00005412)` is TIOCSTI to the kernel (flatpak's CVE-2019-10063).
_INT_MASK = 0xFFFFFFFF
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
AF_VSOCK = 40
ALLOWED_SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
REFUSED_IOCTLS = (TIOCSTI, TIOCLINUX)
PERSONALITY_ALLOWED = (0, 0xFFFFFFFF)


def complement_cubes(values: Iterable[int], width: int = 32) -> Iterator[tuple[int, int]]:
    """(mask, value) pairs whose masked equalities match exactly the `width`-bit words not in
    `values`, with no two matching the same word.

    libseccomp ORs rules and takes one comparison per argument per rule, and an unconditional rule
    replaces a syscall's conditional ones, so "anything but these" must be spelt as such a cover.
    Bits on which the values agree are split first: that keeps the cover near `width` rules.
    """
    wanted = frozenset(values)
    bits = sorted(range(width), key=lambda b: (len({(v >> b) & 1 for v in wanted}), b))
    yield from _cubes(wanted, bits, 0, 0)


def _cubes(
    values: frozenset[int], bits: list[int], mask: int, value: int
) -> Iterator[tuple[int, int]]:
    if not values:
        yield mask, value
        return
    if not bits:
        return  # every bit fixed and the word is one of `values`
    bit, rest = bits[0], bits[1:]
    for side in (0, 1):
        half = frozenset(v for v in values if (v >> bit) & 1 == side)
        yield from _cubes(half, rest, mask | (1 << bit), value | (side << bit))


def _clone_rules() -> tuple[ArgRule, ...]:
    # arg0 of clone is the flags word on x86_64 and aarch64 (s390 swaps arg0 and arg1).
    refused = tuple(
        ArgRule("clone", 0, flag, flag, f"{name}: a new namespace (see unshare)")
        for name, flag in CLONE_NAMESPACE_FLAGS
    )
    why = "threads and processes: no CLONE_NEW* flag"
    return (ArgRule("clone", 0, _CLONE_NAMESPACES, 0, why, None), *refused)


def _personality_rules() -> tuple[ArgRule, ...]:
    # Refuse all but 0 (PER_LINUX) and 0xffffffff (query). Any other 32-bit value has, going round
    # the word, a 1 bit followed by a 0 bit; one masked rule per position i matches exactly those
    # values (32 rules, half of what complement_cubes would give for these two).
    why = "execution domains (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE weaken the process)"
    allowed = tuple(
        ArgRule("personality", 0, _INT_MASK, v, "PER_LINUX, or the query", None)
        for v in PERSONALITY_ALLOWED
    )
    refused = tuple(
        ArgRule("personality", 0, (1 << i) | (1 << ((i + 1) % 32)), 1 << i, why) for i in range(32)
    )
    return (*allowed, *refused)


def _socket_rules() -> tuple[ArgRule, ...]:
    allowed = tuple(
        ArgRule("socket", 0, _INT_MASK, family, "AF_UNIX, AF_INET, AF_INET6", None)
        for family in ALLOWED_SOCKET_FAMILIES
    )
    why = "other families: AF_NETLINK (kernel interfaces), AF_VSOCK (the VM host), AF_PACKET, ..."
    refused = tuple(
        ArgRule("socket", 0, mask, value, why)
        for mask, value in complement_cubes(ALLOWED_SOCKET_FAMILIES)
    )
    return (*allowed, *refused)


def _ioctl_rules() -> tuple[ArgRule, ...]:
    refused = (
        ArgRule(
            "ioctl", 1, _INT_MASK, TIOCSTI, "TIOCSTI: type commands into the caller's terminal"
        ),
        ArgRule("ioctl", 1, _INT_MASK, TIOCLINUX, "TIOCLINUX: console selection and injection"),
    )
    allowed = tuple(
        ArgRule("ioctl", 1, mask, value, "every other request", None)
        for mask, value in complement_cubes(REFUSED_IOCTLS)
    )
    return (*refused, *allowed)


ARG_RULES: tuple[ArgRule, ...] = (
    *_clone_rules(),
    # AF_UNIX (local IPC, the runtime's own control sockets) and AF_INET/AF_INET6 (pip, git,
    # HTTP clients; the net namespace decides where they reach); every other family is refused.
    *_socket_rules(),
    *_ioctl_rules(),
    *_personality_rules(),
)


def allowed_names(machine: str | None = None) -> tuple[str, ...]:
    """The unconditional allowlist on `machine` (default: this one)."""
    machine = machine or platform.machine()
    if machine not in ARCH_ALLOWED_SYSCALLS:
        raise IsolationUnavailableError(f"no seccomp allowlist for the {machine} architecture")
    return (*ALLOWED_SYSCALLS, *ARCH_ALLOWED_SYSCALLS[machine])


@functools.lru_cache(maxsize=1)
def compile_policy() -> bytes:
    """The policy as a BPF program (struct sock_filter array); built and checked on first call."""
    try:
        program = _export_bpf(_build_filter())
    except OSError as exc:
        raise IsolationUnavailableError(f"compiling the seccomp policy failed: {exc}") from exc
    _check_it_loads(program)
    return program


def _nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


def _resolve_all(names: Iterable[str]) -> dict[str, int]:
    numbers = {name: _nr(name) for name in names}
    missing = sorted(name for name, number in numbers.items() if number < 0)
    if missing:  # a hole in the allowlist would break programs in ways hard to trace: refuse
        raise IsolationUnavailableError(
            f"seccomp: {', '.join(missing)} unknown to libseccomp on {platform.machine()}"
        )
    return numbers


def known_syscalls() -> dict[int, str]:
    """Every syscall number this libseccomp knows on this architecture, with its name."""
    known: dict[int, str] = {}
    for number in range(1024):  # the tables of x86_64 and aarch64 end below 500
        try:
            known[number] = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode()
        except ValueError:  # a gap in the table, or past its end
            continue
    return known


def _build_filter() -> pyseccomp.SyscallFilter:
    # The default covers numbers libseccomp does not know; every known one gets a rule below.
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.ENOSYS))
    # libseccomp's default for a foreign arch is KILL_THREAD; kill the whole process.
    syscall_filter.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    # A binary tree of syscall numbers instead of a chain: cheaper to install (the kernel
    # pre-evaluates the filter for every syscall number) and to run on ioctl, socket, clone.
    syscall_filter.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    allowed = _resolve_all(allowed_names())
    special = _resolve_all({rule.syscall for rule in ARG_RULES} | {n for n, _ in ENOSYS_SYSCALLS})
    for number in allowed.values():
        syscall_filter.add_rule(pyseccomp.ALLOW, number)
    # ENOSYS_SYSCALLS get the default (libseccomp refuses a rule that repeats it): no rule.
    for rule in ARG_RULES:
        action = pyseccomp.ALLOW if rule.errno_value is None else pyseccomp.ERRNO(rule.errno_value)
        comparison = pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, rule.mask, rule.value)
        syscall_filter.add_rule(action, special[rule.syscall], comparison)
    covered = set(allowed.values()) | set(special.values())
    for number in known_syscalls():
        if number not in covered:
            syscall_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), number)
    return syscall_filter


def _export_bpf(syscall_filter: pyseccomp.SyscallFilter) -> bytes:
    with os.fdopen(os.memfd_create("cave-seccomp-bpf"), "rb") as file:
        syscall_filter.export_bpf(file)
        file.seek(0)
        return file.read()


# Run in a fresh interpreter (never a fork of a threaded host process): attach the program, then
# check one call of each kind. Prints the results; the parent compares them with the policy.
_SELF_CHECK = """
import ctypes, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
program = os.pread(int(sys.argv[1]), 1 << 16, 0)
buf = ctypes.create_string_buffer(program, len(program))
prog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buf))
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.c_char_p(prog), 0, 0):
    print(json.dumps({"load": os.strerror(ctypes.get_errno())})); sys.exit(0)
out = {}
for name, nr in json.loads(sys.argv[2]).items():
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(-1), ctypes.c_long(-1))
    out[name] = ctypes.get_errno() if ret < 0 else 0
print(json.dumps(out))
"""


def _check_it_loads(program: bytes) -> None:
    """The kernel accepts the program and it answers getpid, ptrace and an unknown number right."""
    import json  # only here: the zygote imports this module's constants, not the check

    probes = {"getpid": _nr("getpid"), "ptrace": _nr("ptrace"), "unknown": 1023}
    expected = {"getpid": 0, "ptrace": errno.EPERM, "unknown": errno.ENOSYS}
    fd = os.memfd_create("cave-seccomp-check")
    try:
        os.write(fd, program)
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _SELF_CHECK, str(fd), json.dumps(probes)],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=30,
            env={},
        )
    finally:
        os.close(fd)
    try:
        got = json.loads(done.stdout)
    except ValueError:
        got = {"error": done.stderr.strip()[-300:] or f"exit {done.returncode}"}
    if got != expected:
        raise IsolationUnavailableError(f"the seccomp policy does not load as built: {got}")


def policy_table() -> str:
    """The policy as Markdown (allowlist, argument rules, notable refusals), as in the docs."""
    allowed = ", ".join(f"`{name}`" for name in ALLOWED_SYSCALLS)
    lines = [f"**Allowed on every architecture** ({len(ALLOWED_SYSCALLS)}): {allowed}.", ""]
    for machine, names in ARCH_ALLOWED_SYSCALLS.items():
        listed = ", ".join(f"`{name}`" for name in names) or "nothing more"
        lines += [f"**Also allowed on {machine}**: {listed}.", ""]
    rows = [f"| `{name}` | ENOSYS | {why} |" for name, why in ENOSYS_SYSCALLS]
    seen: set[tuple[str, str]] = set()
    for rule in ARG_RULES:
        if (rule.syscall, rule.why) not in seen:  # cubes share one reason
            seen.add((rule.syscall, rule.why))
            action = "ALLOW" if rule.errno_value is None else errno.errorcode[rule.errno_value]
            rows.append(f"| `{rule.syscall}` ({_condition(rule)}) | {action} | {rule.why} |")
    rows += [f"| `{name}` | EPERM | {why} |" for name, why in NOTABLE_REFUSALS]
    return "\n".join([*lines, "| Syscall | Action | Why |", "|---|---|---|", *rows])


def _condition(rule: ArgRule) -> str:
    if rule.syscall == "personality":
        return "arg0 0 or 0xffffffff" if rule.errno_value is None else "any other arg0"
    if rule.syscall == "socket":
        return "arg0 1, 2 or 10" if rule.errno_value is None else "any other arg0"
    if rule.syscall == "ioctl" and rule.errno_value is None:
        return "any other arg1"
    return f"arg{rule.arg} & {rule.mask:#x} == {rule.value:#x}"


if __name__ == "__main__":  # `python -m actors.isolation.seccomp_policy [pfc]`
    if sys.argv[1:] == ["pfc"]:  # libseccomp's readable listing of the generated filter
        _build_filter().export_pfc(sys.stdout)
    else:
        print(policy_table())
