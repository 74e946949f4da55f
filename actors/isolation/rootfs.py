"""A sandbox's root filesystem: read-only base, OverlayFS on a size-capped tmpfs, /proc, /dev."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from actors.isolation import syscalls as sc

# Host directories shown read-only in every sandbox that uses the host as its base. Symlinks among
# them (merged-/usr distributions: /bin -> usr/bin) are copied as symlinks into the base instead.
HOST_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# /etc is not shown whole: secrets (shadow, ssh host keys, sudoers, credentials) stay on the host.
ETC_ALLOWLIST = (
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "host.conf",
    "protocols",
    "services",
    "mime.types",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "issue",
    "profile",
    "bash.bashrc",
    "inputrc",
    "magic",
    "magic.mime",
    "locale.alias",
    "python3",
    "python3.11",
    "environment",
)
BASE_DIRS = {
    "proc": 0o555,
    "dev": 0o755,
    "tmp": 0o1777,
    "workspace": 0o755,
    "root": 0o700,
    "home": 0o755,
    "etc": 0o755,
    "run": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
    "sys": 0o555,
}
# Inodes the sandbox user must own to write there (the lower layer belongs to host root).
SANDBOX_OWNED = ("workspace", "root", "tmp", "var/tmp", "run")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
BASE_VERSION = "1"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\nnogroup:x:65534:\n"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@dataclass(frozen=True)
class RootfsSpec:
    """What the mount setup needs; plain values so that it crosses the control socket as JSON."""

    base: str  # lower layer
    sandbox_dir: str  # per-sandbox host directory holding the mount points
    disk_bytes: int
    shm_bytes: int
    uid: int  # host uid the sandbox's root maps to
    hostname: str
    host_binds: tuple[str, ...]  # host system dirs bound read-only over the base


def ensure_host_base(state_dir: Path) -> tuple[Path, tuple[str, ...]]:
    """Build (once per node) the lower layer that borrows the host's /usr; returns it, its binds."""
    base = state_dir / f"base-v{BASE_VERSION}"
    binds = tuple(d for d in HOST_SYSTEM_DIRS if _is_real_dir(Path("/") / d))
    if (base / ".complete").exists():
        return base, binds
    staging = state_dir / f".base-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    _populate_base(staging)
    try:
        staging.rename(base)
    except OSError:  # another actor on this node won the race; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return base, binds


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _populate_base(root: Path) -> None:
    for rel, mode in BASE_DIRS.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(root / rel, mode)
    (root / "home" / "user").mkdir()
    for name in HOST_SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            os.symlink(os.readlink(host), root / name)
        elif host.is_dir():
            (root / name).mkdir()
    _populate_etc(root / "etc")
    (root / ".complete").write_text(BASE_VERSION)


def _populate_etc(etc: Path) -> None:
    for name in ETC_ALLOWLIST:
        src = Path("/etc") / name
        if src.is_symlink():
            os.symlink(os.readlink(src), etc / name)
        elif src.is_dir():
            shutil.copytree(src, etc / name, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, etc / name)
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    (etc / "hosts").write_text(HOSTS)
    (etc / "resolv.conf").write_text("")  # no DNS: the sandbox has no network beyond loopback


def mount_disk(spec: RootfsSpec) -> None:
    """The size-capped tmpfs under the overlay, mounted by the launcher in its own mount namespace.

    The launcher keeps that namespace (and so this mount) for the sandbox's life, which lets it
    resize the disk when a warm sandbox is claimed with other limits; the host never sees it.
    """
    sc.mount("none", "/", None, sc.MS_REC | sc.MS_PRIVATE)
    disk = Path(spec.sandbox_dir, "disk")
    disk.mkdir(exist_ok=True)
    sc.mount(
        "cave-disk",
        str(disk),
        "tmpfs",
        sc.MS_NOSUID | sc.MS_NODEV,
        f"size={spec.disk_bytes},mode=0755",
    )
    for sub in ("upper", "work"):
        (disk / sub).mkdir()
    os.chown(disk / "upper", spec.uid, spec.uid)


def resize_disk(spec: RootfsSpec, disk_bytes: int) -> None:
    sc.mount(
        "none",
        str(Path(spec.sandbox_dir, "disk")),
        None,
        sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV,
        f"size={disk_bytes}",
    )


def assemble(spec: RootfsSpec) -> None:
    """Mount the sandbox root and pivot into it, as host root in new mount and pid namespaces."""
    disk, merged = Path(spec.sandbox_dir, "disk"), Path(spec.sandbox_dir, "root")
    merged.mkdir(exist_ok=True)
    sc.mount(
        "cave-root",
        str(merged),
        "overlay",
        sc.MS_NODEV,
        f"lowerdir={spec.base},upperdir={disk}/upper,workdir={disk}/work",
    )
    for rel in SANDBOX_OWNED:
        os.chown(merged / rel, spec.uid, spec.uid)
    for name in spec.host_binds:
        _bind_readonly(f"/{name}", str(merged / name))
    sc.mount("proc", str(merged / "proc"), "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    _mount_dev(merged / "dev", spec)
    _enter_root(str(merged))
    _loopback_up()
    socket.sethostname(spec.hostname)


def _bind_readonly(source: str, target: str) -> None:
    sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC)
    sc.mount(
        "none", target, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
    )


def _mount_dev(dev: Path, spec: RootfsSpec) -> None:
    sc.mount("cave-dev", str(dev), "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        (dev / name).touch()
        sc.mount(f"/dev/{name}", str(dev / name), None, sc.MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, dev / name)
    (dev / "shm").mkdir()
    sc.mount(
        "cave-shm",
        str(dev / "shm"),
        "tmpfs",
        sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
        f"size={spec.shm_bytes},mode=1777",
    )
    os.chown(dev / "shm", spec.uid, spec.uid)
    sc.mount("none", str(dev), None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NOEXEC)


def _enter_root(new_root: str) -> None:
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no host path.
    os.chdir(new_root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def _loopback_up() -> None:
    siocsifflags, iff_up_running = 0x8914, 0x1 | 0x40
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", iff_up_running | 0x8))
