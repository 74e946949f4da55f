"""Sandbox cgroups on the real kernel (limits, OOM, pids, kill, sweep) and driver detection."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.isolation.cgroups import (
    CgroupDriver,
    CgroupLimits,
    Mount,
    SandboxCgroup,
    _V2Cgroup,
    detect,
    open_driver,
    read_mounts,
)
from cave.errors import InvalidArgumentError, IsolationUnavailableError

MiB = 1 << 20
LIMITS = CgroupLimits(memory_bytes=64 * MiB, pids=64, cpu=0.5)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="real cgroups need root")


def wait_until(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.01)


def read_limit(cgroup: SandboxCgroup, filename: str) -> str:
    """A cgroup file read back from whichever hierarchy holds it (v1) or the one directory (v2)."""
    for procs in cgroup.procs_files():
        path = os.path.join(os.path.dirname(procs), filename)
        if os.path.exists(path):
            return Path(path).read_text().strip()
    raise AssertionError(f"no {filename} in {cgroup.procs_files()}")


def spawn_inside(cgroup: SandboxCgroup, python_code: str) -> subprocess.Popen[str]:
    """Run python in the cgroup: the shell joins every hierarchy before exec, so nothing escapes."""
    joins = "; ".join(f"echo $$ > {shlex.quote(f)}" for f in cgroup.procs_files())
    script = f"set -e; {joins}; exec {shlex.quote(sys.executable)} -c {shlex.quote(python_code)}"
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.fixture(scope="module")
def driver() -> Iterator[CgroupDriver]:
    if os.geteuid() != 0:
        pytest.skip("real cgroups need root")
    root = f"cave-test-{uuid.uuid4().hex[:8]}"
    drv = open_driver(root)
    yield drv
    for base in drv._bases.values():
        os.rmdir(base)


@pytest.fixture
def make_cgroup(driver: CgroupDriver) -> Iterator[Callable[..., SandboxCgroup]]:
    made: list[SandboxCgroup] = []

    def make(limits: CgroupLimits = LIMITS) -> SandboxCgroup:
        made.append(driver.create(f"sb-{uuid.uuid4().hex[:12]}", limits))
        return made[-1]

    yield make
    for cgroup in made:
        cgroup.destroy()


@needs_root
def test_create_writes_limits_and_set_limits_changes_them(
    driver: CgroupDriver, make_cgroup: Callable[..., SandboxCgroup]
) -> None:
    cgroup = make_cgroup(LIMITS)
    expect_limits(driver, cgroup, LIMITS)
    for limits in (CgroupLimits(256 * MiB, 100, 2.0), CgroupLimits(32 * MiB, 10, 0.25)):
        cgroup.set_limits(limits)  # raise then lower: memsw ordering must hold both ways
        expect_limits(driver, cgroup, limits)


def expect_limits(driver: CgroupDriver, cgroup: SandboxCgroup, limits: CgroupLimits) -> None:
    quota = str(round(limits.cpu * 100_000))
    assert read_limit(cgroup, "pids.max") == str(limits.pids)
    if driver.version == 2:
        assert read_limit(cgroup, "memory.max") == str(limits.memory_bytes)
        assert read_limit(cgroup, "memory.swap.max") == "0"
        assert read_limit(cgroup, "cpu.max") == f"{quota} 100000"
        return
    assert read_limit(cgroup, "memory.limit_in_bytes") == str(limits.memory_bytes)
    assert read_limit(cgroup, "memory.memsw.limit_in_bytes") == str(limits.memory_bytes)
    assert "oom_kill_disable 0" in read_limit(cgroup, "memory.oom_control")
    assert read_limit(cgroup, "cpu.cfs_period_us") == "100000"
    assert read_limit(cgroup, "cpu.cfs_quota_us") == quota


@needs_root
def test_memory_hog_is_oom_killed(make_cgroup: Callable[..., SandboxCgroup]) -> None:
    cgroup = make_cgroup(CgroupLimits(memory_bytes=64 * MiB, pids=16, cpu=1.0))
    before = cgroup.oom_kill_count()
    hog = spawn_inside(cgroup, "b = b'x' * (128 << 20); print('survived')")
    out, _ = hog.communicate(timeout=60)
    assert hog.returncode == -signal.SIGKILL
    assert "survived" not in out
    assert cgroup.oom_kill_count() > before
    assert cgroup.memory_peak_bytes() <= 64 * MiB


FORK_BOMB = """
import errno, json, os
r, w = os.pipe()
made, refused = [], []
for _ in range(100):
    try:
        pid = os.fork()
    except OSError as exc:
        refused.append(exc.errno)
        continue
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    made.append(pid)
os.close(w)
for pid in made:
    os.waitpid(pid, 0)
print(json.dumps({"made": len(made), "refused": refused}))
"""


@needs_root
def test_pids_limit_refuses_forks(make_cgroup: Callable[..., SandboxCgroup]) -> None:
    cgroup = make_cgroup(CgroupLimits(memory_bytes=256 * MiB, pids=20, cpu=1.0))
    bomb = spawn_inside(cgroup, FORK_BOMB)
    out, _ = bomb.communicate(timeout=60)
    result = json.loads(out)
    assert bomb.returncode == 0
    assert result["made"] <= 19  # the bomb itself is the twentieth
    assert len(result["refused"]) >= 81
    assert set(result["refused"]) == {11}  # EAGAIN
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks


TREE = """
import os, sys, time
for _ in range(3):
    if os.fork() == 0:
        time.sleep(1000)
if os.fork() == 0:  # the classic daemon: fork, setsid, fork again, parent exits
    os.setsid()
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(1000)
    os._exit(0)
time.sleep(1000)
"""


@needs_root
def test_kill_all_kills_tree_and_double_forked_daemon(
    make_cgroup: Callable[..., SandboxCgroup],
) -> None:
    cgroup = make_cgroup()
    tree = spawn_inside(cgroup, TREE)
    assert tree.stdout is not None
    daemon = int(tree.stdout.readline())
    wait_until(lambda: len(cgroup.pids()) >= 5)  # root, three children, daemon
    assert daemon in cgroup.pids()
    assert os.getsid(daemon) != os.getsid(tree.pid)  # really detached: own session,
    wait_until(lambda: parent_of(daemon) != tree.pid)  # and reparented away from the tree
    cgroup.kill_all()
    assert cgroup.pids() == []
    assert tree.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: is_gone(daemon))


RUNNER = """
import os
while True:  # a new pid every iteration: a kill by a pid list read earlier always misses
    try:
        if os.fork():
            os._exit(0)
    except OSError:
        pass
"""


@needs_root
def test_kill_all_stops_a_fork_runner(make_cgroup: Callable[..., SandboxCgroup]) -> None:
    cgroup = make_cgroup(CgroupLimits(memory_bytes=128 * MiB, pids=20, cpu=1.0))
    runners = [spawn_inside(cgroup, RUNNER) for _ in range(4)]
    wait_until(lambda: len(cgroup.pids()) >= 4)
    cgroup.kill_all()
    assert cgroup.pids() == []
    for runner in runners:  # the first process either left on its own or died with the rest
        runner.wait(timeout=30)


@needs_root
def test_destroy_removes_every_hierarchy_and_is_idempotent(
    driver: CgroupDriver, make_cgroup: Callable[..., SandboxCgroup]
) -> None:
    cgroup = make_cgroup()
    dirs = [os.path.dirname(p) for p in cgroup.procs_files()]
    assert len(dirs) == (1 if driver.version == 2 else 4)
    sleeper = spawn_inside(cgroup, "import time; time.sleep(1000)")
    wait_until(lambda: bool(cgroup.pids()))
    cgroup.destroy()
    assert not [d for d in dirs if os.path.exists(d)]
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    cgroup.destroy()
    cgroup.kill_all()
    assert cgroup.pids() == []


@needs_root
def test_sweep_removes_stale_and_keeps_live(
    driver: CgroupDriver, make_cgroup: Callable[..., SandboxCgroup]
) -> None:
    stale, live = make_cgroup(), make_cgroup()
    orphan = spawn_inside(stale, "import time; time.sleep(1000)")
    wait_until(lambda: bool(stale.pids()))
    removed = driver.sweep(lambda name: name != stale.name)
    assert removed == [stale.name]
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert not [p for p in stale.procs_files() if os.path.exists(os.path.dirname(p))]
    assert all(os.path.exists(p) for p in live.procs_files())


@needs_root
def test_v2_kill_and_destroy_on_the_real_kernel() -> None:
    """Hosts that bind controllers to v1 still offer a bare v2 mount: cgroup.kill works there."""
    v2 = [m.path for m in read_mounts() if m.fstype == "cgroup2"]
    if not v2:
        pytest.skip("no cgroup v2 mount")
    name = f"cave-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(os.path.join(v2[0], name))
    cgroup = _V2Cgroup("sb", {"unified": os.path.join(v2[0], name, "sb")})
    try:
        os.mkdir(os.path.dirname(cgroup.procs_files()[0]))
        tree = spawn_inside(cgroup, TREE)
        assert tree.stdout is not None
        daemon = int(tree.stdout.readline())
        cgroup.kill_all()
        assert cgroup.pids() == []
        assert tree.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: is_gone(daemon))
    finally:
        cgroup.destroy()
        os.rmdir(os.path.join(v2[0], name))


@needs_root
def test_bad_names_and_limits_are_refused(driver: CgroupDriver) -> None:
    for name in ("../escape", "a/b", "", "cgroup.procs"):
        with pytest.raises(InvalidArgumentError):
            driver.create(name, LIMITS)
    with pytest.raises(InvalidArgumentError):
        CgroupLimits(memory_bytes=0, pids=1, cpu=1.0)


def test_bogus_v2_root_is_unavailable() -> None:
    with pytest.raises(IsolationUnavailableError, match="not a cgroup v2 directory"):
        open_driver("/sys/fs/cgroup/no-such-delegated-cgroup")
    with pytest.raises(IsolationUnavailableError):
        open_driver("/tmp")


def fake_v2(tmp_path: Path, controllers: str) -> Mount:
    """A directory shaped like a cgroup2 mount with the root `cave` and sandbox `sb` made."""
    mount = tmp_path / "v2"
    for d in (mount, mount / "cave", mount / "cave" / "sb"):
        d.mkdir(parents=True)
        (d / "cgroup.controllers").write_text(controllers)
        (d / "cgroup.subtree_control").write_text("")
    for f in ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cgroup.procs"):
        (mount / "cave" / "sb" / f).write_text("")
    return Mount("cgroup2", str(mount), frozenset({"rw"}))


def fake_v1(tmp_path: Path, controllers: tuple[str, ...]) -> list[Mount]:
    for c in controllers:
        (tmp_path / c).mkdir()
    return [Mount("cgroup", str(tmp_path / c), frozenset({"rw", c})) for c in controllers]


def test_detect_prefers_v2_with_memory_and_pids(tmp_path: Path) -> None:
    mounts = [fake_v2(tmp_path, "cpu memory pids io"), *fake_v1(tmp_path, ("memory", "pids"))]
    driver = detect(mounts, "cave")
    assert driver.version == 2
    assert (tmp_path / "v2" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    cgroup = driver.create("sb", CgroupLimits(memory_bytes=64 * MiB, pids=20, cpu=0.5))
    assert read_limit(cgroup, "memory.max") == str(64 * MiB)
    assert read_limit(cgroup, "memory.swap.max") == "0"
    assert read_limit(cgroup, "pids.max") == "20"
    assert read_limit(cgroup, "cpu.max") == "50000 100000"
    assert cgroup.procs_files() == [str(tmp_path / "v2" / "cave" / "sb" / "cgroup.procs")]


def test_detect_falls_back_to_v1_when_v2_has_no_controllers(tmp_path: Path) -> None:
    mounts = [fake_v2(tmp_path, ""), *fake_v1(tmp_path, ("memory", "pids", "cpu", "freezer"))]
    driver = detect(mounts, "cave")
    assert driver.version == 1
    assert all((tmp_path / c / "cave").is_dir() for c in ("memory", "pids", "cpu", "freezer"))


def test_detect_without_memory_or_pids_is_unavailable(tmp_path: Path) -> None:
    mounts = [fake_v2(tmp_path, "cpu io"), *fake_v1(tmp_path, ("memory", "cpu"))]
    with pytest.raises(IsolationUnavailableError, match="pids"):
        detect(mounts, "cave")
    with pytest.raises(IsolationUnavailableError, match="lacks controllers"):
        detect(mounts, str(tmp_path / "v2" / "cave"))


def test_read_mounts_parses_cgroup_lines(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text(
        "proc /proc proc rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
        "cgroup2 /sys/fs/my\\040cgroup cgroup2 rw 0 0\n"
    )
    assert read_mounts(str(table)) == [
        Mount(
            "cgroup", "/sys/fs/cgroup/cpu,cpuacct", frozenset({"rw", "nosuid", "cpu", "cpuacct"})
        ),
        Mount("cgroup2", "/sys/fs/my cgroup", frozenset({"rw"})),
    ]
