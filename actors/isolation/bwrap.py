"""The bubblewrap backend: the bwrap command line that starts a zygote, its launch and its probe.

bwrap runs as the unprivileged sandbox uid (never as host root) and builds the namespaces and the
root itself; the zygote inside is a fresh interpreter (the host's /usr/bin/python3, seen through
the /usr bind) that imports `actors.isolation` from a read-only bind. Process tree once started:

    host (subreaper) ── zygote: pid 1 of the sandbox's pid namespace ── cave-exec ── command

bwrap's own outer process is killed once the zygote runs, so that the zygote becomes a child of
the host like the builtin backend's: `stop` kills and reaps it, and with it goes every process of
the sandbox (the kernel ends a pid namespace with its init).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from actors.isolation import protocol
from actors.isolation.rootfs import SANDBOX_OWNED, RootfsSpec

CAVE_DIR = "/opt/cave"  # where the sandbox sees our files; not part of the host base
HELPER_PATH = f"{CAVE_DIR}/bin/cave-exec"
CAVE_DIRS = ("/opt", CAVE_DIR, f"{CAVE_DIR}/actors", f"{CAVE_DIR}/bin")
ISOLATION_SOURCE = Path(__file__).resolve().parent  # only this package, not the rest of `actors`
BOOTSTRAP = (
    f"import sys; sys.path.insert(0, {CAVE_DIR!r}); "
    "from actors.isolation.zygote_main import main; main(sys.argv[1:])"
)
# What the zygote keeps inside bwrap's user namespace. cave-exec needs CAP_SYS_ADMIN to unshare a
# pid namespace per exec and CAP_SETPCAP to empty the bounding set before running a command;
# CAP_DAC_OVERRIDE lets the files API reach what a command left chmod 000 (the builtin zygote
# holds every capability of its namespace). Commands get none of them: cave-exec drops all.
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP", "CAP_DAC_OVERRIDE")
TMPFS_PERMS = {"tmp": "1777", "var/tmp": "1777", "root": "0700"}
PROBE_TIMEOUT_S = 30


class BwrapError(Exception):
    """bwrap cannot start a sandbox here; the message says why, in bwrap's own words if any."""


def resolve(bwrap_path: str | None) -> str:
    """Absolute path of the bwrap binary: CAVE_BWRAP_PATH, else `bwrap` on PATH."""
    if bwrap_path:
        if not (os.path.isfile(bwrap_path) and os.access(bwrap_path, os.X_OK)):
            raise BwrapError(f"CAVE_BWRAP_PATH={bwrap_path}: no such executable")
        return os.path.abspath(bwrap_path)
    found = shutil.which("bwrap")
    if found is None:
        raise BwrapError("bubblewrap is not installed (no `bwrap` on PATH; set CAVE_BWRAP_PATH)")
    return found


def sandbox_python(host_binds: tuple[str, ...]) -> str:
    """An interpreter the sandbox can see: ours if it lives under a bound host dir, else /usr's."""
    ours = os.path.realpath(sys.executable)
    for candidate in (ours, "/usr/bin/python3", "/usr/local/bin/python3"):
        top = candidate.lstrip("/").split("/", 1)[0]
        if top in host_binds and os.access(candidate, os.X_OK):
            return candidate
    raise BwrapError(
        "no Python interpreter under the host dirs shown to the sandbox "
        f"({', '.join(host_binds)}); install python3 in /usr/bin"
    )


def command(
    bwrap: str, spec: RootfsSpec, helper: str, zygote_args: list[str], extra: tuple[str, ...] = ()
) -> list[str]:
    """The whole bwrap command line: namespaces, root, our files, then the zygote's interpreter."""
    caps = [arg for cap in ZYGOTE_CAPS for arg in ("--cap-add", cap)]
    dirs = [arg for d in CAVE_DIRS for arg in ("--perms", "0755", "--dir", d)]  # bwrap says 0700
    python = sandbox_python(spec.host_binds)
    return [
        bwrap,
        *("--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0"),
        *("--as-pid-1", "--new-session", "--clearenv", "--hostname", spec.hostname),
        *caps,
        *extra,
        *root_mounts(spec),
        *dirs,
        *("--ro-bind", str(zygote_source(spec)), f"{CAVE_DIR}/actors/isolation"),
        *("--ro-bind", helper, HELPER_PATH),
        *("--remount-ro", "/", "--chdir", "/"),
        *("--", python, "-I", "-S", "-B", "-c", BOOTSTRAP, *zygote_args),
    ]


def zygote_source(spec: RootfsSpec) -> Path:
    """A copy of this package under the state dir, once per node and version of the code.

    bwrap runs as the sandbox uid, which may not reach the checkout (a clone under /root, say);
    the state dir is made for it.
    """
    sources = sorted(ISOLATION_SOURCE.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources))
    target = Path(spec.base).parent / f"zygote-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    staging.mkdir(mode=0o755)
    for source in sources:
        shutil.copyfile(source, staging / source.name)
        (staging / source.name).chmod(0o644)
    try:
        staging.rename(target)
    except OSError:  # another process on this node made the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def root_mounts(spec: RootfsSpec) -> list[str]:
    """The base's top-level entries over bwrap's tmpfs root: what the builtin overlay shows.

    Writable places are size-capped tmpfs mounts; everything else is read-only.
    """
    args: list[str] = []
    with os.scandir(spec.base) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.name.startswith("."):
                args += _top_level(entry, spec)
    for rel in SANDBOX_OWNED:  # nested ones (var/tmp) go over the read-only bind of their parent
        if "/" in rel and os.path.isdir(os.path.join(spec.base, rel)):
            args += _tmpfs(rel, spec.disk_bytes)
    return args


def _top_level(entry: os.DirEntry[str], spec: RootfsSpec) -> list[str]:
    name, target = entry.name, f"/{entry.name}"
    if entry.is_symlink():
        return ["--symlink", os.readlink(entry.path), target]
    if name in spec.host_binds:
        return ["--ro-bind", target, target]
    if name == "proc":
        return ["--proc", "/proc"]
    if name == "dev":
        return ["--dev", "/dev", *_tmpfs("dev/shm", spec.shm_bytes, "1777")]
    if name in SANDBOX_OWNED:
        return _tmpfs(name, spec.disk_bytes)
    return ["--ro-bind", entry.path, target]


def _tmpfs(rel: str, size_bytes: int, perms: str | None = None) -> list[str]:
    perms = perms or TMPFS_PERMS.get(rel, "0755")
    return ["--perms", perms, "--size", str(size_bytes), "--tmpfs", f"/{rel}"]


def probe(bwrap: str, spec: RootfsSpec, helper: str) -> None:
    """Start a throw-away sandbox whose zygote runs `true` through cave-exec; raise if it fails."""
    argv = command(bwrap, spec, helper, ["probe", HELPER_PATH])
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            env={},
            **_as_user(spec.uid),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BwrapError(f"{bwrap} did not start: {exc}") from None
    if result.returncode != 0:
        words = result.stderr.decode(errors="replace").strip()[-600:] or "no message"
        raise BwrapError(
            f"{bwrap} cannot start a sandbox as uid {spec.uid} (exit {result.returncode}): {words}"
        )


def _as_user(uid: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}  # not root: bwrap runs as this process's own uid
    return {"user": uid, "group": uid, "extra_groups": []}


def launch(sock: socket.socket, setup: dict[str, Any], bpf_fd: int) -> NoReturn:
    """Launcher side (already in the cgroup): run bwrap, report `spawned` and `ready`, then exit."""
    spec = RootfsSpec(**setup["rootfs"])
    if int(setup["uid"]) == 0:
        raise BwrapError("refusing to run bwrap as uid 0: the sandbox's root would be the host's")
    bwrap = resolve(setup.get("bwrap_path"))
    info_r, info_w = os.pipe()
    started_r, started_w = os.pipe()
    err_r, err_w = os.pipe()
    log_fd = os.dup(2)  # the zygote's stderr once it runs, as in the builtin backend
    fds = (sock.fileno(), bpf_fd, started_w, log_fd)
    zygote_args = ["serve", *map(str, fds), HELPER_PATH]
    argv = command(bwrap, spec, setup["exec_helper"], zygote_args, ("--info-fd", str(info_w)))
    inherited = (sock.fileno(), info_w, started_w, log_fd, *([bpf_fd] if bpf_fd >= 0 else []))
    pid = os.fork()
    if pid == 0:
        _exec_as_sandbox_user(argv, int(setup["uid"]), inherited, err_w)
    for fd in (info_w, started_w, err_w, log_fd):
        os.close(fd)
    zygote_pid = _read_child_pid(info_r)
    if zygote_pid is not None:
        protocol.send(sock, {"op": "spawned", "pid": zygote_pid})
    if zygote_pid is None or os.read(started_r, 1) != b"r":
        _fail(sock, bwrap, pid, err_r)
    # Without its outer bwrap the zygote is re-parented to the host (our subreaper), which reaps it.
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    protocol.send(sock, {"op": "ready"})
    os._exit(0)


def _exec_as_sandbox_user(
    argv: list[str], uid: int, inherited: tuple[int, ...], err_w: int
) -> NoReturn:
    try:
        os.dup2(err_w, 2)
        for fd in inherited:
            os.set_inheritable(fd, True)
        if os.geteuid() == 0:  # bwrap must never map the sandbox's root to the host's root
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        os.execve(argv[0], argv, {})
    except BaseException as exc:
        os.write(2, f"cannot run {argv[0]}: {exc}\n".encode())
    os._exit(127)


def _read_child_pid(info_r: int) -> int | None:
    """bwrap's --info-fd JSON: the host pid of the sandbox's pid 1 (our zygote, with --as-pid-1)."""
    data = b""
    while chunk := os.read(info_r, 4096):
        data += chunk
        try:
            return int(json.loads(data)["child-pid"])
        except (ValueError, KeyError):
            continue  # not all of it yet
    return None


def _fail(sock: socket.socket, bwrap: str, pid: int, err_r: int) -> NoReturn:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.set_blocking(err_r, False)
    try:
        words = os.read(err_r, 65536).decode(errors="replace").strip()
    except BlockingIOError:
        words = ""
    code = os.waitstatus_to_exitcode(status)
    error = f"{bwrap} exited ({code}) before the zygote ran: {words[-600:] or 'no message'}"
    protocol.send(sock, {"op": "failed", "error": error})
    os._exit(1)
