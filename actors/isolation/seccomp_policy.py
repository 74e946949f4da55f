"""The sandbox's seccomp policy, compiled once to classic BPF; cave-exec installs it per command.

Default action ALLOW; the filter refuses only what a sandboxed command never needs and what would
widen its reach (see `docs/seccomp.md` for the full table, `policy_table()` renders it):

| What                                          | Action                   |
|-----------------------------------------------|--------------------------|
| every name in `DENIED_SYSCALLS`               | ERRNO(EPERM)             |
| `clone` with a CLONE_NEW* flag in arg0        | ERRNO(EPERM)             |
| `clone3` (flags live in memory BPF can't read)| ERRNO(ENOSYS)            |
| `socket` with AF_NETLINK or AF_VSOCK          | ERRNO(EPERM)             |
| `ioctl` with TIOCSTI or TIOCLINUX             | ERRNO(EPERM)             |
| `personality` other than 0 and 0xffffffff     | ERRNO(EPERM)             |
| a foreign architecture (i386 `int 0x80`, x32) | KILL_PROCESS             |
| anything else                                 | ALLOW                    |

The backend calls `compile_policy()` once; the launcher puts the bytes in a memfd and the
`cave-exec` helper (`native/cave-exec.c`) reads it from BPF_FD and attaches it right before
`execvp`, after dropping every capability and setting no_new_privs.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from dataclasses import dataclass

import pyseccomp

from cave.errors import IsolationUnavailableError

_log = logging.getLogger(__name__)

DENIED_SYSCALLS: tuple[tuple[str, str], ...] = (
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
    ("kexec_load", "load a new kernel"),
    ("kexec_file_load", "load a new kernel"),
    ("init_module", "load kernel code"),
    ("finit_module", "load kernel code"),
    ("delete_module", "unload kernel code"),
    ("io_uring_setup", "io_uring: runs syscalls the filter never sees; many kernel CVEs"),
    ("io_uring_enter", "io_uring (see io_uring_setup)"),
    ("io_uring_register", "io_uring (see io_uring_setup)"),
    ("reboot", "restart or halt the machine"),
    ("swapon", "add swap: host memory management"),
    ("swapoff", "remove swap: host memory management"),
    ("userfaultfd", "stall the kernel on a page fault at will: exploit primitive"),
    ("open_by_handle_at", "open files by handle, bypassing the mount view (shocker escape)"),
    ("name_to_handle_at", "produce handles for open_by_handle_at"),
    ("fsopen", "new mount API: build a mount"),
    ("fsconfig", "new mount API: configure a mount"),
    ("fsmount", "new mount API: create a mount"),
    ("fspick", "new mount API: reconfigure a mount"),
    ("move_mount", "new mount API: attach a mount"),
    ("open_tree", "new mount API: clone a mount tree"),
    ("mount_setattr", "new mount API: change mount flags"),
    ("lookup_dcookie", "profiling interface that resolves kernel dentries (removed in 6.8)"),
    ("acct", "switch process accounting on or off for the host"),
    ("settimeofday", "set the host clock"),
    ("clock_settime", "set the host clock"),
    ("clock_adjtime", "adjust the host clock"),
    ("adjtimex", "adjust the host clock"),
    ("syslog", "read or clear the kernel log (leaks addresses)"),
    ("quotactl", "manage host disk quotas"),
    ("nfsservctl", "NFS server control (removed in 3.1; refused in case)"),
    ("vhangup", "hang up the terminal under every process that shares it"),
    ("iopl", "raw I/O port access"),
    ("ioperm", "raw I/O port access"),
)

ENOSYS_SYSCALLS: tuple[tuple[str, str], ...] = (
    (
        "clone3",
        "its flags sit in a struct in memory that seccomp cannot read; ENOSYS makes libc fall"
        " back to clone, where the namespace-flag rules apply (what Docker and runc do)",
    ),
)


@dataclass(frozen=True)
class ArgRule:
    """Refuse `syscall` with `errno_value` when `(argument[arg] & mask) == value`."""

    syscall: str
    arg: int
    mask: int
    value: int
    why: str
    errno_value: int = errno.EPERM


CLONE_NAMESPACE_FLAGS: tuple[tuple[str, int], ...] = (
    ("CLONE_NEWUSER", 0x10000000),
    ("CLONE_NEWNS", 0x00020000),
    ("CLONE_NEWPID", 0x20000000),
    ("CLONE_NEWNET", 0x40000000),
    ("CLONE_NEWIPC", 0x08000000),
    ("CLONE_NEWUTS", 0x04000000),
    ("CLONE_NEWCGROUP", 0x02000000),
)
# The kernel reads these arguments as 32-bit ints, so the mask ignores the upper half of the
# register: `ioctl(fd, 0x1_00005412)` is TIOCSTI to the kernel (flatpak's CVE-2019-10063).
_INT_MASK = 0xFFFFFFFF
AF_NETLINK = 16
AF_VSOCK = 40
TIOCSTI = 0x5412
TIOCLINUX = 0x541C


def _clone_rules() -> tuple[ArgRule, ...]:
    # arg0 of clone is the flags word on x86_64 and aarch64 (s390 swaps arg0 and arg1).
    return tuple(
        ArgRule("clone", 0, flag, flag, f"{name}: a new namespace (see unshare)")
        for name, flag in CLONE_NAMESPACE_FLAGS
    )


def _personality_rules() -> tuple[ArgRule, ...]:
    # Allow only 0 (PER_LINUX) and 0xffffffff (query). libseccomp takes one comparison per
    # argument per rule, and a rule list is an OR, so "x != 0 and x != 0xffffffff" cannot be
    # written directly. Any other 32-bit value has, going round the word, a 1 bit followed by
    # a 0 bit; one masked rule per position i matches exactly those values.
    why = "execution domains (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE weaken the process)"
    return tuple(
        ArgRule("personality", 0, (1 << i) | (1 << ((i + 1) % 32)), 1 << i, why) for i in range(32)
    )


ARG_RULES: tuple[ArgRule, ...] = (
    *_clone_rules(),
    # AF_UNIX (local IPC, the runtime's own control sockets) and AF_INET/AF_INET6 (pip, git,
    # HTTP clients; the net namespace decides where they reach) stay allowed.
    ArgRule(
        "socket",
        0,
        _INT_MASK,
        AF_NETLINK,
        "AF_NETLINK: kernel interfaces (routing, audit, uevents)",
    ),
    ArgRule("socket", 0, _INT_MASK, AF_VSOCK, "AF_VSOCK: talks to the VM host's agents"),
    ArgRule("ioctl", 1, _INT_MASK, TIOCSTI, "TIOCSTI: type commands into the caller's terminal"),
    ArgRule("ioctl", 1, _INT_MASK, TIOCLINUX, "TIOCLINUX: console selection and injection"),
    *_personality_rules(),
)


@functools.lru_cache(maxsize=1)
def compile_policy() -> bytes:
    """The policy as a BPF program (struct sock_filter array); built on first call, then cached."""
    try:
        program = _export_bpf(_build_filter())
    except OSError as exc:
        raise IsolationUnavailableError(f"compiling the seccomp policy failed: {exc}") from exc
    return program


def _build_filter() -> pyseccomp.SyscallFilter:
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # libseccomp's default for a foreign arch is KILL_THREAD; kill the whole process.
    syscall_filter.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    # A binary tree of syscall numbers instead of a chain: ~25% cheaper to install (the kernel
    # pre-evaluates the filter for every syscall number) and to run on ioctl, socket, clone.
    syscall_filter.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    for name, _ in DENIED_SYSCALLS:
        _add_rule(syscall_filter, errno.EPERM, name)
    for name, _ in ENOSYS_SYSCALLS:
        _add_rule(syscall_filter, errno.ENOSYS, name)
    for rule in ARG_RULES:
        comparison = pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, rule.mask, rule.value)
        _add_rule(syscall_filter, rule.errno_value, rule.syscall, comparison)
    return syscall_filter


def _add_rule(
    syscall_filter: pyseccomp.SyscallFilter, errno_value: int, name: str, *args: pyseccomp.Arg
) -> None:
    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    if number < 0:  # unknown to this libseccomp, or absent on this architecture
        _log.debug("seccomp: skipping %s, not a syscall here (%d)", name, number)
        return
    syscall_filter.add_rule(pyseccomp.ERRNO(errno_value), number, *args)


def _export_bpf(syscall_filter: pyseccomp.SyscallFilter) -> bytes:
    with os.fdopen(os.memfd_create("cave-seccomp-bpf"), "rb") as file:
        syscall_filter.export_bpf(file)
        file.seek(0)
        return file.read()


def policy_table() -> str:
    """The policy as a Markdown table (syscall, action, why), as in `docs/seccomp.md`."""
    rows = [f"| `{name}` | EPERM | {why} |" for name, why in DENIED_SYSCALLS]
    rows += [f"| `{name}` | ENOSYS | {why} |" for name, why in ENOSYS_SYSCALLS]
    seen: set[tuple[str, str]] = set()
    for rule in ARG_RULES:
        if (rule.syscall, rule.why) not in seen:  # personality has 32 rules, one reason
            seen.add((rule.syscall, rule.why))
            action = errno.errorcode[rule.errno_value]
            rows.append(f"| `{rule.syscall}` ({_condition(rule)}) | {action} | {rule.why} |")
    return "\n".join(["| Syscall | Action | Why |", "|---|---|---|", *rows])


def _condition(rule: ArgRule) -> str:
    if rule.syscall == "personality":
        return "arg0 not 0 nor 0xffffffff"
    return f"arg{rule.arg} & {rule.mask:#x} == {rule.value:#x}"


if __name__ == "__main__":  # `python -m actors.isolation.seccomp_policy [pfc]`
    import sys

    if sys.argv[1:] == ["pfc"]:  # libseccomp's readable listing of the generated filter
        _build_filter().export_pfc(sys.stdout)
    else:
        print(policy_table())
