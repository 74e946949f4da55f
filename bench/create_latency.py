"""Create-to-ready: from the warm pool, and cold (pool size 0: the create pays a worker start)."""

from __future__ import annotations

import os
import time

import ray

from actors.sandboxes import create_sandbox, stop_sandbox, warm_pool
from bench.common import bench_settings, percentiles, report, start_ray, stop_ray

N = int(os.environ.get("CAVE_BENCH_CREATES", "30"))


def wait_warm(settings, size: int) -> None:  # type: ignore[no-untyped-def]
    pool = warm_pool(ray.get_runtime_context().get_node_id(), settings)
    deadline = time.monotonic() + 120
    while ray.get(pool.stats.remote())["ready"] < size:
        if time.monotonic() > deadline:
            raise TimeoutError("the warm pool did not fill")
        time.sleep(0.02)


def measure(settings, warm: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    stop_sandbox(create_sandbox(settings).id)  # the first create also starts the directory actor
    samples = []
    for _ in range(N):
        if warm:
            wait_warm(settings, 1)  # a refill between creates, as between real user requests
        start = time.perf_counter()
        sandbox = create_sandbox(settings)
        samples.append(time.perf_counter() - start)
        stop_sandbox(sandbox.id)
    return percentiles(samples)


def main() -> None:
    # One cluster each: a node's pool is a named singleton, created with its first settings.
    start_ray()
    rows = {
        "create, cold (no pool: worker start)": measure(bench_settings(CAVE_POOL_SIZE="0"), False),
    }
    stop_ray()
    start_ray()
    rows["create, warm pool"] = measure(bench_settings(CAVE_POOL_SIZE="2"), True)
    stop_ray()
    report(rows, baseline="create, cold (no pool: worker start)")


if __name__ == "__main__":
    main()
