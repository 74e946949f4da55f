"""Per-sandbox cgroups on v1 or v2: limits, membership, accounting, kill and removal."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cave.errors import InvalidArgumentError, IsolationUnavailableError, SandboxError

CPU_PERIOD_US = 100_000
DESTROY_TIMEOUT_S = 5.0
_POLL_S = 0.005
_FREEZE_TIMEOUT_S = 1.0
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    pids: int
    cpu: float

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.pids <= 0 or self.cpu <= 0:
            raise InvalidArgumentError(f"cgroup limits must be positive: {self}")

    @property
    def cpu_quota_us(self) -> int:
        return max(1000, round(self.cpu * CPU_PERIOD_US))  # the kernel refuses quotas under 1 ms


@dataclass(frozen=True)
class Mount:
    fstype: str
    path: str
    options: frozenset[str]


def read_mounts(table: str = "/proc/self/mounts") -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a mounts table."""
    with open(table) as f:
        rows = [line.split() for line in f]
    return [
        Mount(r[2], _unescape(r[1]), frozenset(r[3].split(",")))
        for r in rows
        if len(r) >= 4 and r[2] in ("cgroup", "cgroup2")
    ]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc.strerror}") from exc


def _write(path: str, value: str) -> None:
    # One write() per value: cgroup files parse each write on its own.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _keyed(path: str, key: str) -> int:
    for line in _read(path).splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    raise SandboxError(f"{path} has no {key!r} line (kernel too old?)")


def _procs(directory: str) -> list[int]:
    """Pids in one cgroup directory; an already-removed cgroup holds none."""
    try:
        return sorted(int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split())
    except SandboxError:
        if not os.path.isdir(directory):
            return []
        raise


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError as exc:
        parent = os.path.dirname(path)
        raise IsolationUnavailableError(f"cgroup hierarchy {parent} is missing") from exc
    except OSError as exc:
        raise SandboxError(f"cannot create cgroup {path}: {exc.strerror}") from exc


def _sigkill(pid: int) -> None:
    if pid == os.getpid():
        raise SandboxError(f"refusing to SIGKILL the calling process {pid}: it is in the cgroup")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_for(done: Callable[[], bool], deadline: float) -> bool:
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _check_swap_file(path: str) -> bool:
    """Whether the swap limit file exists; without it, swap must be off or limits leak."""
    if os.path.exists(path):
        return True
    with open("/proc/swaps") as f:
        if len(f.read().splitlines()) > 1:
            raise IsolationUnavailableError(f"{path} is missing but swap is on: limits would leak")
    return False


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"cgroup name must match {_NAME.pattern}: {name!r}")
    return name


class SandboxCgroup(ABC):
    """One sandbox's cgroup: a directory per hierarchy (v1) or a single one (v2)."""

    def __init__(self, name: str, dirs: dict[str, str]) -> None:
        self.name = name
        self._dirs = dirs  # controller (v1) or "unified" (v2) -> directory

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self._dirs.values()]

    def attach(self, pid: int) -> None:
        for path in self.procs_files():
            _write(path, str(pid))

    def pids(self) -> list[int]:
        return _procs(self._main_dir)

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, double-forked daemons included; wait until empty."""
        self._kill(time.monotonic() + DESTROY_TIMEOUT_S)

    def destroy(self) -> None:
        """kill_all, then rmdir in every hierarchy; a cgroup already gone is fine."""
        deadline = time.monotonic() + DESTROY_TIMEOUT_S
        if any(os.path.isdir(d) for d in self._dirs.values()):
            self._kill(deadline)
        for d in self._dirs.values():
            _rmtree(d, deadline)

    @property
    def _main_dir(self) -> str:
        return self._dirs.get("memory") or self._dirs["unified"]

    def _all_pids(self) -> list[int]:
        # A half-finished attach can leave a process in some hierarchies only.
        return sorted({p for d in self._dirs.values() for p in _procs(d)})

    def _kill_loop(self, deadline: float) -> None:
        """Freeze, SIGKILL every member, thaw; repeat until empty. Freezing stops fork races."""
        while self._all_pids():
            if time.monotonic() >= deadline:
                raise SandboxError(f"cgroup {self.name} still has {self._all_pids()} after kill")
            froze = self._set_frozen(True)
            try:
                if froze:  # FREEZING can hang on tasks in uninterruptible sleep: SIGKILL anyway
                    _wait_for(self._is_frozen, min(deadline, time.monotonic() + _FREEZE_TIMEOUT_S))
                for pid in self._all_pids():
                    _sigkill(pid)
            finally:
                if froze:
                    self._set_frozen(False)  # v1 frozen tasks only act on SIGKILL once thawed
            _wait_for(lambda: not self._all_pids(), min(deadline, time.monotonic() + 0.1))

    def _set_frozen(self, frozen: bool) -> bool:
        """Freeze or thaw the cgroup; False when there is no freezer to use."""
        return False

    def _is_frozen(self) -> bool:
        return False

    def _kill(self, deadline: float) -> None:
        self._kill_loop(deadline)

    @abstractmethod
    def set_limits(self, limits: CgroupLimits) -> None: ...

    @abstractmethod
    def oom_kill_count(self) -> int: ...

    @abstractmethod
    def memory_peak_bytes(self) -> int: ...


def _rmtree(directory: str, deadline: float) -> None:
    """rmdir a cgroup (children first), retrying while the kernel still counts exiting tasks."""
    if not os.path.isdir(directory):
        return
    for child in _subdirs(directory):
        _rmtree(os.path.join(directory, child), deadline)
    if not _wait_for(lambda: _try_rmdir(directory), deadline):
        raise SandboxError(f"cannot remove cgroup {directory}: still busy after kill")


def _subdirs(directory: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SandboxError(f"cannot list cgroup {directory}: {exc.strerror}") from exc


def _try_rmdir(directory: str) -> bool:
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise SandboxError(f"cannot remove cgroup {directory}: {exc.strerror}") from exc
        for pid in _procs(directory):  # a process may have joined after the kill
            _sigkill(pid)
        return False
    return True


class _V2Cgroup(SandboxCgroup):
    def _file(self, name: str) -> str:
        return os.path.join(self._dirs["unified"], name)

    def set_limits(self, limits: CgroupLimits) -> None:
        _write(self._file("memory.max"), str(limits.memory_bytes))
        if _check_swap_file(self._file("memory.swap.max")):
            _write(self._file("memory.swap.max"), "0")
        _write(self._file("pids.max"), str(limits.pids))
        if os.path.exists(self._file("cpu.max")):  # cpu is optional: not every host delegates it
            _write(self._file("cpu.max"), f"{limits.cpu_quota_us} {CPU_PERIOD_US}")

    def oom_kill_count(self) -> int:
        return _keyed(self._file("memory.events"), "oom_kill")

    def memory_peak_bytes(self) -> int:
        peak = self._file("memory.peak")  # added in 5.19; fall back to the current usage
        path = peak if os.path.exists(peak) else self._file("memory.current")
        return int(_read(path))

    def _kill(self, deadline: float) -> None:
        if not os.path.exists(self._file("cgroup.kill")):  # before 5.14: signal loop, unfrozen
            self._kill_loop(deadline)
            return
        _write(self._file("cgroup.kill"), "1")
        if not _wait_for(lambda: not self._all_pids(), deadline):
            raise SandboxError(f"cgroup {self.name} still has {self._all_pids()} after cgroup.kill")


class _V1Cgroup(SandboxCgroup):
    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self._dirs[controller], name)

    def set_limits(self, limits: CgroupLimits) -> None:
        self._set_memory(limits.memory_bytes)
        _write(self._file("memory", "memory.oom_control"), "0")  # keep the OOM killer on
        _write(self._file("pids", "pids.max"), str(limits.pids))
        if "cpu" in self._dirs:
            _write(self._file("cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(self._file("cpu", "cpu.cfs_quota_us"), str(limits.cpu_quota_us))

    def _set_memory(self, memory_bytes: int) -> None:
        limit = self._file("memory", "memory.limit_in_bytes")
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        if not _check_swap_file(memsw):
            _write(limit, str(memory_bytes))
            return
        # The kernel insists memsw >= limit after every write: raise memsw first, lower it last.
        raising = memory_bytes >= int(_read(limit))
        for path in (memsw, limit) if raising else (limit, memsw):
            _write(path, str(memory_bytes))

    def oom_kill_count(self) -> int:
        return _keyed(self._file("memory", "memory.oom_control"), "oom_kill")

    def memory_peak_bytes(self) -> int:
        return int(_read(self._file("memory", "memory.max_usage_in_bytes")))

    def _set_frozen(self, frozen: bool) -> bool:
        if "freezer" not in self._dirs or not os.path.isdir(self._dirs["freezer"]):
            return False
        _write(self._file("freezer", "freezer.state"), "FROZEN" if frozen else "THAWED")
        return True

    def _is_frozen(self) -> bool:
        return _read(self._file("freezer", "freezer.state")).strip() == "FROZEN"


class CgroupDriver:
    """Creates and sweeps sandbox cgroups under one root (CAVE_CGROUP_ROOT)."""

    def __init__(self, version: int, bases: dict[str, str]) -> None:
        self.version = version
        self._bases = bases  # controller (v1) or "unified" (v2) -> root directory

    def create(self, name: str, limits: CgroupLimits) -> SandboxCgroup:
        """mkdir (idempotent) and write the limits; on failure sweep or destroy cleans up."""
        cgroup = self._handle(_check_name(name))
        for base in self._bases.values():
            _mkdir(os.path.join(base, name))
        cgroup.set_limits(limits)
        return cgroup

    def sweep(self, is_alive: Callable[[str], bool]) -> list[str]:
        """Kill and remove every cgroup whose sandbox is dead; one stuck cgroup skips, not stops."""
        removed = []
        for name in sorted(self._names()):
            if is_alive(name):
                continue
            try:
                self._handle(name).destroy()
            except SandboxError as exc:
                _log.warning("sweep left cgroup %s: %s", name, exc)
                continue
            removed.append(name)
        return removed

    def _names(self) -> set[str]:
        names = {n for base in self._bases.values() for n in _subdirs(base)}
        return {n for n in names if _NAME.fullmatch(n)}

    def _handle(self, name: str) -> SandboxCgroup:
        dirs = {c: os.path.join(base, name) for c, base in self._bases.items()}
        return _V2Cgroup(name, dirs) if self.version == 2 else _V1Cgroup(name, dirs)


def open_driver(root: str = "cave") -> CgroupDriver:
    """The driver for this host: v2 when it offers memory and pids, else v1, else an error."""
    return detect(read_mounts(), root)


def detect(mounts: Iterable[Mount], root: str) -> CgroupDriver:
    mounts = list(mounts)
    if os.path.isabs(root):  # an operator-delegated v2 cgroup: never fall back to v1
        return CgroupDriver(2, {"unified": _prepare_v2(_delegated_v2(mounts, root))})
    _check_name(root)
    for m in mounts:
        if m.fstype == "cgroup2" and {"memory", "pids"} <= _controllers(m.path):
            _enable(m.path)
            _mkdir(os.path.join(m.path, root))
            return CgroupDriver(2, {"unified": _prepare_v2(os.path.join(m.path, root))})
    return CgroupDriver(1, _v1_bases(mounts, root))


def _controllers(directory: str) -> set[str]:
    try:
        return set(_read(os.path.join(directory, "cgroup.controllers")).split())
    except SandboxError:
        return set()


def _delegated_v2(mounts: list[Mount], root: str) -> str:
    path = os.path.realpath(root)
    v2 = [m.path for m in mounts if m.fstype == "cgroup2"]
    if not any(os.path.commonpath([path, m]) == m for m in v2) or not os.path.isdir(path):
        raise IsolationUnavailableError(f"CAVE_CGROUP_ROOT {root} is not a cgroup v2 directory")
    return path


def _prepare_v2(base: str) -> str:
    missing = {"memory", "pids"} - _controllers(base)
    if missing:
        raise IsolationUnavailableError(f"cgroup v2 {base} lacks controllers {sorted(missing)}")
    if "cpu" not in _controllers(base):
        _log.warning("cgroup v2 %s offers no cpu controller: cpu limits are not enforced", base)
    _enable(base)
    return base


def _enable(directory: str) -> None:
    """Pass memory, pids (and cpu if offered) down to the children of a v2 cgroup."""
    path = os.path.join(directory, "cgroup.subtree_control")
    enabled = set(_read(path).split())
    wanted = _controllers(directory) & {"memory", "pids", "cpu"}
    todo = " ".join(f"+{c}" for c in sorted(wanted - enabled))
    if not todo:
        return
    try:
        _write(path, todo)
    except SandboxError as exc:
        raise IsolationUnavailableError(
            f"{exc} (a v2 cgroup holding processes cannot delegate: move them to a leaf)"
        ) from exc


def _v1_bases(mounts: list[Mount], root: str) -> dict[str, str]:
    v1 = [m for m in mounts if m.fstype == "cgroup"]
    found = {c: m.path for m in v1 for c in m.options & set(_V1_CONTROLLERS)}
    missing = [c for c in ("memory", "pids") if c not in found]
    if missing:
        raise IsolationUnavailableError(
            f"no usable cgroups: no v2 mount offers memory+pids and v1 lacks {missing}"
        )
    bases = {c: os.path.join(found[c], root) for c in _V1_CONTROLLERS if c in found}
    for base in bases.values():
        _mkdir(base)
    return bases
