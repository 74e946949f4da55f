"""Which isolation this node gives (namespaces, bubblewrap or degraded), probed once per process.

Fails closed: bubblewrap is never used without cgroups, and with CAVE_ENV=production (or
CAVE_ISOLATION_NO_FALLBACK=true) anything short of namespaces + seccomp + cgroups is refused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from actors.isolation import bwrap
from actors.isolation.cgroups import CgroupDriver, open_driver
from actors.isolation.guarantees import Isolation
from actors.isolation.native.build import ensure_exec_helper
from actors.isolation.rootfs import RootfsSpec, ensure_host_base
from actors.isolation.seccomp_policy import compile_policy
from cave.errors import CaveError, IsolationUnavailableError
from config.settings import IsolationSettings

log = logging.getLogger("cave.isolation")

PR_SET_CHILD_SUBREAPER = 36
_PROBE = (
    "import os; from actors.isolation import syscalls as sc;"
    "sc.unshare(sc.CLONE_NEWNS|sc.CLONE_NEWPID|sc.CLONE_NEWNET|sc.CLONE_NEWIPC|sc.CLONE_NEWUTS);"
    "pid=os.fork();\nif pid==0: sc.unshare(sc.CLONE_NEWUSER); os._exit(0)\n"
    "os._exit(os.waitstatus_to_exitcode(os.waitpid(pid,0)[1]))"
)


@dataclass(frozen=True)
class Backend:
    name: str  # "builtin" | "bwrap" | "none" (degraded)
    isolated: bool
    state_dir: Path
    base: Path
    host_binds: tuple[str, ...]
    sandbox_uid: int
    cgroups: CgroupDriver | None
    exec_helper: Path
    seccomp_bpf: bytes | None
    bwrap_path: str | None = None  # the bwrap binary the probe ran (bwrap backend only)
    reason: str | None = None  # why this backend is less than full isolation (degraded only)

    @property
    def isolation(self) -> Isolation:
        """What this backend really gives each sandbox, as the API reports it."""
        return Isolation(
            self.name,
            namespaces=self.isolated,
            seccomp=self.seccomp_bpf is not None,
            cgroups=self.cgroups is not None,
            overlayfs=self.name == "builtin",
            reason=self.reason,
        )


def namespaces_work() -> bool:
    """Can this process create the sandbox namespaces? Probed in a child, so failing is free."""
    root = str(Path(__file__).resolve().parents[2])
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=root,
        capture_output=True,
        env={"PYTHONPATH": root},
        timeout=30,
    )
    overlay = "overlay" in Path("/proc/filesystems").read_text()
    return probe.returncode == 0 and overlay


@cache
def _warn_degraded(reason: str) -> None:
    banner = "!" * 78
    log.warning(
        "%s\nCAVE IS RUNNING SANDBOXES WITHOUT ISOLATION: %s\n"
        "Untrusted code can read and change this host. Set CAVE_ENV=production or "
        "CAVE_ISOLATION_NO_FALLBACK=true to refuse instead.\n%s",
        banner,
        reason,
        banner,
    )


def _refusal(settings: IsolationSettings) -> str:
    if settings.production:
        return "CAVE_ENV=production requires namespaces, seccomp and cgroups"
    return "CAVE_ISOLATION_NO_FALLBACK=true"


def select_backend(settings: IsolationSettings) -> Backend:
    _become_subreaper()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    helper = ensure_exec_helper(settings.state_dir)
    reasons = []
    for name, make in _CANDIDATES[settings.backend]:
        try:
            return make(settings, helper)
        except CaveError as exc:
            reasons.append(f"{name}: {exc}")
    reason = "; ".join(reasons) or "CAVE_ISOLATION_BACKEND=none asked for no isolation"
    if settings.production or settings.no_fallback:
        raise IsolationUnavailableError(
            f"cannot isolate sandboxes: {reason} ({_refusal(settings)})"
        )
    _warn_degraded(reason)
    return _degraded(settings, helper, reason)


def _degraded(settings: IsolationSettings, helper: Path, reason: str) -> Backend:
    """No namespaces: the zygote runs on the host, with cgroups and seccomp where they work."""
    lacking = [reason]
    cgroups = _cgroups_or_none(settings, lacking)
    seccomp = _seccomp_or_none(lacking)
    return Backend(
        "none",
        False,
        settings.state_dir,
        settings.state_dir,
        (),
        settings.sandbox_uid,
        cgroups,
        helper,
        seccomp,
        reason="; ".join(lacking),
    )


def _builtin(settings: IsolationSettings, helper: Path) -> Backend:
    if not namespaces_work():
        raise IsolationUnavailableError(
            "the namespaces needed (user, pid, mount, net, ipc, uts) "
            "or OverlayFS are not available to this process"
        )
    if settings.rootfs is not None:
        base, binds = settings.rootfs, tuple[str, ...]()
    else:
        base, binds = ensure_host_base(settings.state_dir)
    return Backend(
        "builtin",
        True,
        settings.state_dir,
        base,
        binds,
        settings.sandbox_uid,
        open_driver(settings.cgroup_root),
        helper,
        compile_policy(),
    )


# --- bwrap backend (actors/isolation/bwrap.py) ---
def _bwrap(settings: IsolationSettings, helper: Path) -> Backend:
    if settings.rootfs is not None:
        raise IsolationUnavailableError(
            "CAVE_ROOTFS is not supported: the zygote runs on the "
            "host's Python, which a custom root does not have"
        )
    base, binds = ensure_host_base(settings.state_dir)
    # Not root: bwrap runs as this service's own uid, the only one it can map without privileges.
    uid = settings.sandbox_uid if os.geteuid() == 0 else os.geteuid()
    spec = RootfsSpec(str(base), "", 1 << 20, 1 << 20, uid, "cave-probe", binds)
    cgroups = _required_cgroups(settings)  # never bwrap without memory, pids and CPU limits
    try:
        path = bwrap.resolve(settings.bwrap_path)
        bwrap.probe(path, spec, str(helper))
    except bwrap.BwrapError as exc:
        raise IsolationUnavailableError(str(exc)) from None
    return Backend(
        "bwrap",
        True,
        settings.state_dir,
        base,
        binds,
        uid,
        cgroups,
        helper,
        compile_policy(),
        bwrap_path=path,
    )


_CANDIDATES: dict[str, tuple[tuple[str, Callable[[IsolationSettings, Path], Backend]], ...]] = {
    "auto": (("builtin", _builtin), ("bwrap", _bwrap)),
    "builtin": (("builtin", _builtin),),
    "bwrap": (("bwrap", _bwrap),),
    "none": (),
}
# --- end bwrap backend ---


def _required_cgroups(settings: IsolationSettings) -> CgroupDriver:
    try:
        return open_driver(settings.cgroup_root)
    except CaveError as exc:
        raise IsolationUnavailableError(
            f"no cgroups ({exc}): bubblewrap is never used without memory, pids and CPU limits"
        ) from None


def _seccomp_or_none(lacking: list[str]) -> bytes | None:
    try:
        return compile_policy()
    except CaveError as exc:
        log.warning("no seccomp filter for sandboxes: %s", exc)
        lacking.append(f"no seccomp: {exc}")
        return None


def _cgroups_or_none(settings: IsolationSettings, lacking: list[str]) -> CgroupDriver | None:
    try:
        return open_driver(settings.cgroup_root)
    except CaveError as exc:
        log.warning("no cgroups for sandboxes (%s): memory, pids and CPU are not limited", exc)
        lacking.append(f"no cgroups: {exc}")
        return None


def _become_subreaper() -> None:
    # Each zygote outlives the launcher that forked it; as subreaper this process inherits and
    # reaps it instead of leaving zombies to the host's init.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
