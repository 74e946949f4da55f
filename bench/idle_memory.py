"""What idle sandboxes cost on one node: host memory in use before and after creating them, their
processes' proportional set size (PSS) by kind, and the CPU their idle processes use.

    CAVE_BENCH_IDLE=100 python -m bench.idle_memory
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from actors.sandboxes import create_sandbox, stop_sandbox
from bench.common import bench_settings, process_table, start_ray, stop_ray

COUNT = int(os.environ.get("CAVE_BENCH_IDLE", "100"))
CPU_WINDOW_S = 10.0
TICK = os.sysconf("SC_CLK_TCK")


def used_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    kib = lambda key: int(info[key].split()[0]) * 1024  # noqa: E731
    return kib("MemTotal") - kib("MemAvailable")


def sandbox_processes() -> dict[int, str]:
    """The idle sandboxes' processes by kind: the hosts' Ray workers and their fork servers,
    each sandbox's keeper (the launcher that stays), its zygote (the sandbox's init) and
    anything below."""
    procs = process_table()
    kinds: dict[int, str] = {}
    for pid, (_, cmd) in procs.items():
        if cmd.startswith("ray::SandboxService"):
            kinds[pid] = "Ray worker (the host)"
    for _ in range(4):  # the host's fork server, its keepers, their zygotes, then the rest
        for pid, (parent, _) in procs.items():
            if pid in kinds or parent not in kinds:
                continue
            kinds[pid] = {
                "Ray worker (the host)": "fork server",
                "fork server": "keeper",
                "keeper": "zygote (the sandbox's init)",
            }.get(kinds[parent], "other sandbox processes")
    return kinds


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(label: str, **env: str) -> float:
    """Create COUNT idle sandboxes on a fresh cluster, print what they cost; GiB in total."""
    settings = bench_settings(CAVE_POOL_SIZE="0", CAVE_POOL_MAX="0", **env)
    start_ray()
    before = used_bytes()
    start = time.perf_counter()
    sandboxes = [create_sandbox(settings) for _ in range(COUNT)]
    elapsed = time.perf_counter() - start
    for sandbox in sandboxes[:3]:
        assert sandbox.run("true").result.exit_code == 0
    time.sleep(2)  # let the workers settle after their first calls before reading memory
    total = used_bytes() - before
    print(
        f"\n{label}: {COUNT} idle sandboxes: {total / 2**30:.2f} GiB in total, "
        f"{total / COUNT / 2**20:.1f} MiB each (created one by one in {elapsed:.1f} s)"
    )
    kinds = sandbox_processes()
    pss: Counter[str] = Counter()
    for pid, kind in kinds.items():
        pss[kind] += pss_kib(pid)
    for kind, kib in pss.most_common():
        print(f"  PSS {kind:32s} {kib / COUNT / 1024:6.1f} MiB per sandbox")
    cpu_before = {pid: cpu_s(pid) for pid in kinds}
    time.sleep(CPU_WINDOW_S)
    idle_cpu: dict[str, float] = {}
    for pid, kind in kinds.items():
        idle_cpu[kind] = idle_cpu.get(kind, 0.0) + cpu_s(pid) - cpu_before[pid]
    busy = sum(idle_cpu.values()) / CPU_WINDOW_S
    each = busy / COUNT * 1000
    print(f"  idle CPU: {busy:.2f} cores for {COUNT} sandboxes, {each:.2f} ms/s each")
    for kind, seconds in sorted(idle_cpu.items(), key=lambda item: -item[1]):
        print(f"    {kind:32s} {seconds / CPU_WINDOW_S / COUNT * 1000:6.2f} ms/s per sandbox")
    for sandbox in sandboxes:
        stop_sandbox(sandbox.id)
    stop_ray()
    return total / 2**30


def main() -> None:
    # Baseline: a host per sandbox (each runs one and ends), what CAVE was before issue 13.
    before = measure("a worker per sandbox (before)", CAVE_POOL_MAX_INCARNATIONS="1")
    shared = measure("shared hosts (default)")
    print(f"\nshared hosts take x{shared / before:.2f} the memory of a worker per sandbox")


if __name__ == "__main__":
    main()
