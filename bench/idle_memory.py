"""Memory of 100 idle sandboxes on one node: host memory in use before and after."""

from __future__ import annotations

import os
import time

from actors.sandboxes import create_sandbox, stop_sandbox
from bench.common import bench_settings, start_ray, stop_ray

COUNT = int(os.environ.get("CAVE_BENCH_IDLE", "100"))


def used_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    kib = lambda key: int(info[key].split()[0]) * 1024  # noqa: E731
    return kib("MemTotal") - kib("MemAvailable")


def main() -> None:
    settings = bench_settings(CAVE_POOL_SIZE="0")
    start_ray()
    before = used_bytes()
    start = time.perf_counter()
    sandboxes = [create_sandbox(settings) for _ in range(COUNT)]
    elapsed = time.perf_counter() - start
    for sandbox in sandboxes[:3]:
        assert sandbox.run("true").result.exit_code == 0
    time.sleep(2)  # let the workers settle after their first calls before reading memory
    after = used_bytes()
    total = after - before
    print(
        f"{COUNT} idle sandboxes: {total / 2**30:.2f} GiB in total, "
        f"{total / COUNT / 2**20:.1f} MiB each (created in {elapsed:.1f} s)"
    )
    for sandbox in sandboxes:
        stop_sandbox(sandbox.id)
    stop_ray()


if __name__ == "__main__":
    main()
