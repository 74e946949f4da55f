"""Standby process that becomes a sandbox: cgroup, namespaces, root filesystem, then the zygote.

Started ahead of time for the host side, forked by its fork server (actors/isolation/
forkserver.py), with two sockets: the zygote's control channel and the keeper channel. It waits
for one `setup` message. With the builtin
backend it then stays as the sandbox's keeper: it holds the mount namespace where the disk tmpfs
lives and resizes it on request. `python -m actors.isolation.launcher FD KEEPER_FD` runs one on
its own.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import sys
from typing import Any, NoReturn

from actors.isolation import bwrap, protocol, rootfs
from actors.isolation import syscalls as sc
from actors.isolation.sandbox_files import WORKSPACE
from actors.isolation.zygote import Zygote

# Unshared by the zygote itself: the launcher keeps a mount namespace of its own, whose /proc
# still shows the zygote for writing its uid map after the zygote has pivoted its root.
CHILD_NAMESPACES = sc.CLONE_NEWNS | sc.CLONE_NEWNET | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS
# The sandbox's user namespace is created with this euid plus the launcher's host pid, unique on
# the host while the sandbox lives (pid_max is at most 2**22). The kernel charges the namespace's
# inotify, fanotify, mqueue and namespace counts to its owner in the parent namespace: owned by
# host root, one sandbox could spend root's budget (128 inotify instances by default) for the host
# and every other sandbox. No host process runs with these uids, so no one outside is the owner.
OWNER_UID_BASE = 2_000_000_000
# Per user namespace limits (/proc/sys/user), set by the zygote in its own namespace: bounded
# whatever the host allows. fanotify_init is refused by seccomp anyway; commands need no user
# namespace (cave-exec creates only pid and mount namespaces per exec).
USER_NS_LIMITS = {
    "max_inotify_instances": 128,
    "max_inotify_watches": 65536,
    "max_fanotify_groups": 0,
    "max_fanotify_marks": 0,
    "max_user_namespaces": 0,
}


def _high_fd(fd: int) -> int:
    """Move fd above the numbers that posix_spawn's dup2 actions overwrite (0-3)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(fd)
    return high


def _seccomp_memfd(setup: dict[str, Any]) -> int:
    """The seccomp program (compiled by the host) in a memfd that cave-exec reads; -1 for none."""
    if not setup.get("seccomp_bpf"):
        return -1
    fd = os.memfd_create("cave-seccomp", os.MFD_CLOEXEC)
    os.write(fd, bytes.fromhex(setup["seccomp_bpf"]))
    return _high_fd(fd)


def main() -> NoReturn:
    run(int(sys.argv[1]), int(sys.argv[2]))


def run(sock_fd: int, keeper_fd: int) -> NoReturn:
    sock = socket.socket(fileno=sock_fd)
    keeper = socket.socket(fileno=keeper_fd)
    for channel in (sock, keeper):
        channel.set_inheritable(False)
    protocol.send(sock, {"op": "standby", "pid": os.getpid()})
    setup, _ = protocol.recv(sock)
    if setup is None:
        os._exit(0)
    try:
        _first_to_go()
        if setup.get("backend") == "bwrap":  # bwrap backend: see actors/isolation/bwrap.py
            _launch_bwrap(sock, setup)
        if setup["isolated"]:
            _launch_isolated(sock, keeper, setup)
        _launch_degraded(sock, setup)
    except Exception as exc:  # report, never hang the host side waiting for `ready`
        protocol.send(sock, {"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)


def _first_to_go() -> None:
    """Make this sandbox the kernel's first choice when the node runs out of memory: nodes take
    more sandboxes than their memory holds at once (placement.memory_overcommit), and a global
    OOM must end a sandbox, not a Ray process or the API. Every process of the sandbox inherits
    it, and none can lower it (that needs CAP_SYS_RESOURCE on the host)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def _join_cgroup(setup: dict[str, Any]) -> None:
    for procs in setup["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")  # "0" is the writer itself, whatever pid namespace it sees


def _launch_isolated(sock: socket.socket, keeper: socket.socket, setup: dict[str, Any]) -> NoReturn:
    spec = rootfs.RootfsSpec(**setup["rootfs"])
    os.setgroups([])
    sc.unshare(sc.CLONE_NEWNS)  # ours alone: the disk mount lives here, unseen by the host
    rootfs.mount_disk(spec)
    sc.unshare(sc.CLONE_NEWPID)
    launcher_pid = os.getpid()
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        keeper.close()
        os.close(to_parent_r)
        os.close(to_child_w)
        _become_zygote(sock, setup, to_parent_w, to_child_r, launcher_pid)
    sock.close()
    os.close(to_parent_w)
    os.close(to_child_r)
    zygote = os.pidfd_open(pid)
    protocol.send(keeper, {"op": "spawned", "pid": pid})
    if os.read(to_parent_r, 1) == b"u":  # the child has its user namespace; map its root
        _write_id_maps(pid, int(setup["uid"]))
        os.write(to_child_w, b"m")
    _keep(keeper, zygote, spec)


def _keep(keeper: socket.socket, zygote: int, spec: rootfs.RootfsSpec) -> NoReturn:
    """Stay beside the zygote: resize its disk on request; end with it, or end it with the host."""
    while True:
        ready, _, _ = select.select([keeper.fileno(), zygote], [], [])
        if zygote in ready:
            os.waitid(os.P_PIDFD, zygote, os.WEXITED)
            os._exit(0)
        message, _ = protocol.recv(keeper)
        if message is None:  # the host side is gone: take the sandbox with it
            signal.pidfd_send_signal(zygote, signal.SIGKILL)
            continue
        try:
            rootfs.resize_disk(spec, int(message["disk_bytes"]))
            reply: dict[str, Any] = {"id": message.get("id"), "ok": True}
        except (OSError, KeyError, ValueError) as exc:
            reply = {"id": message.get("id"), "error": str(exc)}
        protocol.send(keeper, reply)


def _write_id_maps(pid: int, uid: int) -> None:
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {uid} 1\n")


def _unshare_user_as(owner_uid: int) -> None:
    """unshare(CLONE_NEWUSER) with `owner_uid` as the euid, so that it owns the new namespace.

    The real and saved uids stay 0, which keeps the permitted capabilities; the effective ones,
    cleared by the euid change, are raised again so that the unshare stays privileged.
    """
    os.setresuid(0, owner_uid, 0)
    sc.raise_effective_capabilities()
    sc.unshare(sc.CLONE_NEWUSER)


def _limit_user_namespace() -> None:
    for name, value in USER_NS_LIMITS.items():
        with open(f"/proc/sys/user/{name}", "w") as f:
            f.write(str(value))


def _become_zygote(
    sock: socket.socket, setup: dict[str, Any], to_parent: int, from_parent: int, owner_pid: int
) -> NoReturn:
    try:
        sc.set_parent_death_signal(signal.SIGKILL)  # the launcher's end is the sandbox's end
        # Opened before pivot_root: afterwards the host path is gone, /proc/self/fd/N still runs it.
        helper_fd = _high_fd(os.open(setup["exec_helper"], os.O_RDONLY | os.O_CLOEXEC))
        # The zygote joins the cgroup, not the keeper: only the sandbox's own processes are
        # limited and counted there. Its cgroup namespace then hides the host's hierarchy.
        _join_cgroup(setup)
        if setup["cgroup_procs"]:
            sc.unshare(sc.CLONE_NEWCGROUP)
        bpf_fd = _seccomp_memfd(setup)
        sc.unshare(CHILD_NAMESPACES)
        rootfs.assemble(rootfs.RootfsSpec(**setup["rootfs"]))
        # The user namespace comes last: mount, net, uts and ipc namespaces stay owned by the
        # host's user namespace: even the zygote's capabilities cannot remount or reconfigure them.
        _unshare_user_as(OWNER_UID_BASE + owner_pid)
        os.write(to_parent, b"u")
        if os.read(from_parent, 1) != b"m":
            raise RuntimeError("the launcher did not map the sandbox user")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        _limit_user_namespace()
        os.close(to_parent)
        os.close(from_parent)
    except Exception as exc:
        protocol.send(sock, {"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    protocol.send(sock, {"op": "ready"})
    Zygote(sock, f"/proc/self/fd/{helper_fd}", bpf_fd, workspace=WORKSPACE).serve()


# --- bwrap backend (actors/isolation/bwrap.py) ---
def _launch_bwrap(sock: socket.socket, setup: dict[str, Any]) -> NoReturn:
    """bwrap builds namespaces and root as the sandbox uid; the cgroup is joined first, as root."""
    _join_cgroup(setup)
    bwrap.launch(sock, setup, _seccomp_memfd(setup))


# --- end bwrap backend ---


def _launch_degraded(sock: socket.socket, setup: dict[str, Any]) -> NoReturn:
    """No namespaces: the zygote runs on the host as the sandbox uid, in its own directory."""
    _join_cgroup(setup)
    bpf_fd = _seccomp_memfd(setup)
    uid = int(setup["uid"])
    workspace = os.path.join(setup["rootfs"]["sandbox_dir"], "workspace")
    os.makedirs(workspace, exist_ok=True)
    os.chown(workspace, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    protocol.send(sock, {"op": "spawned", "pid": os.getpid()})
    protocol.send(sock, {"op": "ready"})
    Zygote(sock, setup["exec_helper"], bpf_fd, isolated=False, workspace=workspace).serve()


if __name__ == "__main__":
    main()
