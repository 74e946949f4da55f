"""A soak of create / exec / delete cycles (sized for CI; bench/churn.py runs it longer) leaves
nothing behind: no process, mount, cgroup, network device or directory of any sandbox it ran,
and no Ray worker beyond the pool's hosts."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.sandboxes import SandboxHandle, directory, stop_sandbox
from actors.warm_pool import NAMESPACE, WarmPool, pinned
from config.settings import PoolSettings, Settings, load_settings
from tests.support import poll_until

pytestmark = pytest.mark.usefixtures("ray_cluster")
CYCLES = 60
CLIENTS = 4
CEILING = 3


@pytest.fixture(scope="module")
def settings(cave_state_dir: Path) -> Settings:
    return load_settings(env={**os.environ, "CAVE_STATE_DIR": str(cave_state_dir)})


@pytest.fixture
def pool(settings: Settings) -> Iterator[Any]:
    node = ray.get_runtime_context().get_node_id()
    wanted = PoolSettings(
        size_per_node=1, max_per_node=CEILING, idle_s=600, max_incarnations=25, hosts_per_node=4
    )
    handle = WarmPool.options(
        name=f"soak-pool-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE, **pinned(node)
    ).remote(node, settings.isolation, settings.defaults, wanted)
    yield handle
    ray.get(handle.drain.remote())
    ray.kill(handle)


def _cycle(pool: Any, settings: Settings, n: int) -> tuple[str, Any]:
    sandbox_id = uuid.uuid4().hex
    ref, info = ray.get(pool.create.remote(sandbox_id, settings.defaults, directory()))
    sandbox = SandboxHandle(sandbox_id, info.node_id, ref)
    out = sandbox.run(f"echo {n} > f; sleep 0.01 & cat f")
    assert out.stdout == f"{n}\n".encode()
    stop_sandbox(sandbox_id)
    return info.slot, ref.actor


def _net_devices() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def test_a_soak_of_cycles_leaves_nothing_behind(pool: Any, settings: Settings) -> None:
    devices = _net_devices()
    with ThreadPoolExecutor(CLIENTS) as clients:
        ran = list(clients.map(lambda n: _cycle(pool, settings, n), range(CYCLES)))
    slots = {slot for slot, _ in ran}
    assert len(slots) == CYCLES  # each sandbox its own slot: cgroup, directory, hostname
    stats = poll_until(
        lambda: (s := ray.get(pool.stats.remote()))["filling"] == 0 and s,
        what="the pool at rest",
    )
    # Workers: the cycles ran in a few hosts (a new one only for a worn one: 25 sandboxes
    # each); the worn ones ended once their last stop had answered.
    hosts = {actor._actor_id.hex(): actor for _, actor in ran}
    assert len(hosts) <= stats["hosts_started"] <= CYCLES // 25 + 2

    def alive() -> list[Any]:
        return [a for i, a in hosts.items() if ray._private.state.actors(i)["State"] == "ALIVE"]

    poll_until(lambda: len(alive()) <= stats["hosts"], what="the worn hosts ended")
    spares = alive()

    cgroup_root = settings.isolation.cgroup_root
    for slot in slots:
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{cgroup_root}/{slot}")), slot
        assert not list(Path("/sys/fs/cgroup").glob(f"{cgroup_root}/{slot}")), slot
        assert not (settings.isolation.state_dir / "sandboxes" / slot).exists(), slot
    mounts = Path("/proc/self/mountinfo").read_text()
    assert not [slot for slot in slots if slot in mounts]
    assert _net_devices() == devices
    # No process of a finished sandbox: the hosts that ran cycles and live on hold only spares,
    # each with the one keeper of a prepared next sandbox.
    worker_pids = set(ray.get([actor.__ray_call__.remote(_pid) for actor in spares]))
    forked = dict(_forked())  # each host's fork server, and the launchers it forked
    servers = {pid for pid, parent in forked.items() if parent in worker_pids}
    keepers = [pid for pid, parent in forked.items() if parent in servers]
    in_hosts = sum(map(Counter, ray.get([a.load.remote() for a in spares])), start=Counter())
    assert in_hosts["running"] == 0 and len(keepers) == in_hosts["standby"] <= stats["ready"]


def _pid(_: Any) -> int:
    return os.getpid()


def _forked() -> Iterator[tuple[int, int]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"actors.isolation.forkserver" in cmd:
            yield int(entry.name), int(stat[stat.rindex(")") + 2 :].split()[1])
