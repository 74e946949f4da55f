"""The long soak: CAVE_BENCH_CYCLES (1,000) create / exec / delete cycles through the driver's
handles, CAVE_BENCH_CLIENTS (8) at a time, on the default pool; then counts what is left on the
node of every sandbox it ran: processes, mounts, cgroups, network devices, state directories,
and the Ray workers beyond the pool's hosts. tests/test_soak.py runs the same, shorter, in CI.

    python -m bench.soak
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from actors.sandboxes import create_sandbox, stop_sandbox, warm_pool
from bench.common import bench_settings, process_table, start_ray, stop_ray
from config.settings import Settings

CYCLES = int(os.environ.get("CAVE_BENCH_CYCLES", "1000"))
CLIENTS = int(os.environ.get("CAVE_BENCH_CLIENTS", "8"))


def cycle(settings: Settings, n: int) -> str:
    sandbox = create_sandbox(settings)
    out = sandbox.run(f"echo {n} > f; sleep 0.01 & cat f")
    assert out.stdout == f"{n}\n".encode(), out
    slot = sandbox.info().slot
    stop_sandbox(sandbox.id)
    return slot


def sandbox_processes() -> dict[str, int]:
    """The hosts' workers, their fork servers, and what those forked (keepers and zygotes)."""
    table = process_table()
    hosts = {pid for pid, (_, cmd) in table.items() if cmd.startswith("ray::SandboxService")}
    servers = {pid for pid, (parent, _) in table.items() if parent in hosts}
    keepers = {pid for pid, (parent, _) in table.items() if parent in servers}
    below = {pid for pid, (parent, _) in table.items() if parent in keepers}
    return {"hosts": len(hosts), "keepers": len(keepers), "below keepers": len(below)}


def leftovers(settings: Settings, slots: set[str]) -> dict[str, int]:
    root = settings.isolation.cgroup_root
    cgroups = sum(
        bool(list(Path("/sys/fs/cgroup").glob(f"*/{root}/{s}")))
        or Path(f"/sys/fs/cgroup/{root}/{s}").exists()
        for s in slots
    )
    mounts = Path("/proc/self/mountinfo").read_text()
    state = settings.isolation.state_dir / "sandboxes"
    return {
        "cgroups": cgroups,
        "mounts": sum(s in mounts for s in slots),
        "directories": sum((state / s).exists() for s in slots),
    }


def pool_stats(pool: ray.actor.ActorHandle) -> dict[str, int]:
    stats: Any = ray.get(pool.stats.remote())  # Ray's stubs can't type a remote result
    return dict(stats)


def main() -> None:
    settings = bench_settings()
    start_ray()
    devices = set(os.listdir("/sys/class/net"))
    stop_sandbox(create_sandbox(settings).id)  # the directory and the pool start
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as clients:
        slots = set(clients.map(lambda n: cycle(settings, n), range(CYCLES)))
    elapsed = time.perf_counter() - start
    pool = warm_pool(ray.get_runtime_context().get_node_id(), settings)
    deadline = time.monotonic() + 60
    while (stats := pool_stats(pool))["filling"] or stats["running"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    while (alive := sandbox_processes())["hosts"] != stats["hosts"]:  # retired ones ending
        assert time.monotonic() < deadline, (alive, stats)
        time.sleep(0.1)
    left = leftovers(settings, slots)
    print(f"{CYCLES} cycles at {CLIENTS} clients in {elapsed:.1f} s ({CYCLES / elapsed:.1f}/s)")
    print(f"  distinct sandboxes (slots): {len(slots)}")
    print(f"  pool: {stats}")
    print(f"  host workers alive: {alive['hosts']} (the pool's: {stats['hosts']})")
    print(f"  keepers alive: {alive['keepers']} (spares: {stats['ready']})")
    print(f"  zygotes and processes below them: {alive['below keepers']}")
    for kind, count in left.items():
        print(f"  {kind} left by the {len(slots)} sandboxes: {count}")
    print(f"  network devices added: {len(set(os.listdir('/sys/class/net')) - devices)}")
    stop_ray()


if __name__ == "__main__":
    main()
