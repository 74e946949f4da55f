"""Churn: clients that each create a sandbox, run `echo hi` in it and delete it, over and over;
cycles per second over HTTP, with sandboxes in shared hosts (the default) and with a worker per
sandbox (CAVE_POOL_MAX_INCARNATIONS=1: each host runs one sandbox and ends, every create waits
for a new worker: what CAVE did before issue 13), each on a scratch cluster from `cave up`.

    python -m bench.churn              # 8 clients, 30 s each (after 5 s of warm-up)
    CAVE_BENCH_CLIENTS=4 CAVE_BENCH_SECONDS=60 python -m bench.churn
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter

from bench.local_cluster import LocalCluster, local_cluster, raise_quotas

CLIENTS = int(os.environ.get("CAVE_BENCH_CLIENTS", "8"))
SECONDS = float(os.environ.get("CAVE_BENCH_SECONDS", "30"))
WARMUP_S = 5.0
NAMESPACE = "churn"


async def churn(cluster: LocalCluster) -> tuple[float, float, Counter[str]]:
    """(cycles per second, median cycle in ms, errors by code) over SECONDS after the warm-up."""
    from cave.client import AsyncCave

    await raise_quotas(cluster, NAMESPACE, CLIENTS * 4)
    cycles: list[tuple[float, float]] = []  # (end, duration)
    errors: Counter[str] = Counter()
    start = time.monotonic()
    end = start + WARMUP_S + SECONDS
    async with AsyncCave(cluster.url, cluster.admin_key, timeout=120, max_retries=0) as client:

        async def one_client() -> None:
            while time.monotonic() < end:
                began = time.monotonic()
                try:
                    sandbox = await client.sandboxes.create(namespace=NAMESPACE)
                    try:
                        result = await sandbox.exec(["echo", "hi"])
                        assert result.stdout == "hi\n", result
                    finally:
                        await client.sandboxes.delete(sandbox.id)
                except Exception as exc:  # counted by code; the client goes on
                    errors[getattr(exc, "code", type(exc).__name__)] += 1
                    continue
                cycles.append((time.monotonic(), time.monotonic() - began))

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    measured = [d for t, d in cycles if t >= start + WARMUP_S]
    median_ms = statistics.median(measured) * 1000 if measured else float("nan")
    return len(measured) / SECONDS, median_ms, errors


def main() -> None:
    rows: dict[str, tuple[float, float, Counter[str]]] = {}
    for name, settings in (
        ("a worker per sandbox (before)", {"CAVE_POOL_MAX_INCARNATIONS": "1"}),
        ("shared hosts (default)", {}),
    ):
        with local_cluster(**settings) as cluster:
            rows[name] = asyncio.run(churn(cluster))
    print(f"\nchurn at {CLIENTS} clients, {SECONDS:g} s, create + `echo hi` + delete over HTTP")
    base = rows["a worker per sandbox (before)"][0]
    for name, (rate, median_ms, errors) in rows.items():
        ratio = f"  x{rate / base:.2f}" if base else ""
        failed = f"  errors {dict(errors)}" if errors else ""
        print(f"  {name:28s} {rate:6.2f} cycles/s  median cycle {median_ms:7.1f} ms{ratio}{failed}")


if __name__ == "__main__":
    main()
