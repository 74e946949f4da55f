"""Create-to-ready through the driver's handle: cold (no pool: the create pays a host's worker
start), from the spare prepared after the stop just before (no floor), and from a warm pool."""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from actors.sandboxes import create_sandbox, stop_sandbox, warm_pool
from bench.common import bench_settings, percentiles, report, start_ray, stop_ray

N = int(os.environ.get("CAVE_BENCH_CREATES", "30"))


def _stats(pool: ray.actor.ActorHandle) -> dict[str, int]:
    stats: Any = ray.get(pool.stats.remote())  # Ray's stubs can't type a remote result
    return dict(stats)


def wait_warm(settings, size: int) -> None:  # type: ignore[no-untyped-def]
    pool = warm_pool(ray.get_runtime_context().get_node_id(), settings)
    deadline = time.monotonic() + 120
    while _stats(pool)["ready"] < size:
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
    cold = "create, cold (no pool: worker start)"
    rows = {}
    for name, settings, warm in (
        (cold, bench_settings(CAVE_POOL_SIZE="0", CAVE_POOL_MAX="0"), False),
        ("create, spare after a stop (no floor)", bench_settings(CAVE_POOL_SIZE="0"), False),
        ("create, warm pool", bench_settings(CAVE_POOL_SIZE="2"), True),
    ):
        start_ray()
        rows[name] = measure(settings, warm)
        stop_ray()
    report(rows, baseline=cold)


if __name__ == "__main__":
    main()
