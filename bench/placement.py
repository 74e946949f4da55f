"""200 sandbox creates over a simulated cluster of sandbox nodes: rate, latency, balance.

Baselines, in the same run and cluster: the same number of sandbox actors placed by Ray's own
SPREAD strategy and doing a create's work (prepare, start) with no directory and no warm pool,
and, for information, plain actors placed alike (a worker start and nothing else). Each sandbox is a
Ray worker process (about 90 MB), so 200 of them need about 20 GB: run it on a quiet machine.

    CAVE_BENCH_CREATES=200 CAVE_BENCH_NODES=4 python -m bench.placement
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.cluster_utils import Cluster

from actors import remote
from actors.sandbox_actor import SandboxActor
from actors.sandboxes import stop_all
from bench.common import bench_settings, percentiles
from config.settings import resolve_limits

N = int(os.environ.get("CAVE_BENCH_CREATES", "200"))
NODES = int(os.environ.get("CAVE_BENCH_NODES", "4"))
CONCURRENCY = int(os.environ.get("CAVE_BENCH_CONCURRENCY", "8"))


@ray.remote(num_cpus=0)
class Plain:
    """The baseline's actor: a worker process, like a sandbox's, doing nothing."""

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def timed_all(
    make: Callable[[int], Awaitable[str]], n: int
) -> tuple[list[float], list[str], float]:
    """Run `make(i)` n times, `CONCURRENCY` at once: per-call seconds, nodes, wall seconds."""
    gate = asyncio.Semaphore(CONCURRENCY)
    samples: list[float] = []
    nodes: list[str] = []

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            nodes.append(await make(i))
            samples.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return samples, nodes, time.perf_counter() - began


def summary(name: str, samples: list[float], nodes: list[str], wall: float, all_nodes: list[str]):  # type: ignore[no-untyped-def]
    counts = Counter(nodes)
    per_node = [counts.get(n, 0) for n in all_nodes]
    mean = statistics.mean(per_node)
    imbalance = (max(per_node) - mean) / mean * 100
    stats = percentiles(samples)
    print(
        f"{name:34s} {len(samples) / wall:7.1f} creates/s  p50 {stats['p50_ms']:7.1f} ms  "
        f"p99 {stats['p99_ms']:7.1f} ms  per node {per_node}  max over mean {imbalance:5.1f}%"
    )
    return len(samples) / wall, stats["p99_ms"], imbalance


async def run(all_nodes: list[str]) -> None:
    settings = bench_settings(CAVE_POOL_SIZE="2", CAVE_MAX_SANDBOXES_PER_NODE=str(N))
    limits = resolve_limits(None, settings)

    # Baselines: Ray's SPREAD over the same sandbox nodes (a sliver of cave_sandbox keeps it
    # off the head), placing plain actors, then sandbox actors doing a create's whole work.
    spread = {"scheduling_strategy": "SPREAD", "resources": {"cave_sandbox": 0.001}}
    actors: list[Any] = []

    async def plain(_: int) -> str:
        actor = Plain.options(**spread).remote()  # type: ignore[attr-defined]
        actors.append(actor)
        return str(await actor.node.remote())

    async def sandbox(i: int) -> str:
        actor = SandboxActor.options(**spread).remote(settings.isolation)
        actors.append(actor)
        await actor.prepare.remote(settings.defaults)
        info = await actor.start.remote(f"spread-{i}", limits, "bench")
        return str(info.node_id)

    summary("Ray SPREAD, plain actors", *(await timed_all(plain, N)), all_nodes)
    for actor in actors:
        ray.kill(actor)
    actors.clear()
    base = summary("Ray SPREAD, sandbox actors", *(await timed_all(sandbox, N)), all_nodes)
    await asyncio.gather(*(actor.stop.remote() for actor in actors))
    for actor in actors:
        ray.kill(actor)

    await remote.ensure_pools(settings)  # as the API's upkeep does when a node joins
    await asyncio.sleep(5)  # let the pools fill, as they would between user requests

    async def create(_: int) -> str:
        _, info = await remote.create(uuid.uuid4().hex, limits, settings)
        return info.node_id

    ours = summary("CAVE placement, sandboxes", *(await timed_all(create, N)), all_nodes)
    print(
        f"ratio (CAVE / SPREAD sandboxes): rate x{ours[0] / base[0]:.2f}, "
        f"p99 x{ours[1] / base[1]:.2f}, "
        f"imbalance {ours[2]:.1f}% vs {base[2]:.1f}%"
    )


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": False, "gcs_server_port": free_port()},
    )
    nodes = [cluster.add_node(num_cpus=4, resources={"cave_sandbox": N}) for _ in range(NODES)]
    ray.init(address=cluster.address, namespace="cave", log_to_driver=False)
    try:
        asyncio.run(run([str(n.node_id) for n in nodes]))
    finally:
        stop_all(timeout_s=120)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
