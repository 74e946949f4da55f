"""ctypes wrappers for Linux calls the standard library lacks (unshare, mount, openat2, prctl)."""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

SYS_PIVOT_ROOT = 155
SYS_OPENAT2 = 437

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} {source} -> {target}",
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def set_parent_death_signal(signum: int) -> None:
    pr_set_pdeathsig = 1
    _check(_libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """openat2(2): open `path` below `dirfd` with kernel-enforced resolution rules."""
    how = struct.pack("QQQ", flags, mode, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    return _check(
        _libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), buf, ctypes.c_size_t(len(how))),
        f"open {path}",
    )


_CAP_VERSION_3 = 0x20080522


def raise_effective_capabilities() -> None:
    """Make the effective capability set the permitted one (after an euid change cleared it)."""
    header = struct.pack("Ii", _CAP_VERSION_3, 0)
    data = ctypes.create_string_buffer(24)  # two __user_cap_data_struct: effective, permitted, inh.
    _check(_libc.capget(header, data), "capget")
    words = list(struct.unpack("6I", data.raw))
    words[0], words[3] = words[1], words[4]  # effective := permitted, for both 32-bit halves
    _check(_libc.capset(header, struct.pack("6I", *words)), "capset")
