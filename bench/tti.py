"""Time to interactive: create a sandbox and run its first command (`echo hi`), the way the public
sandbox leaderboard measures providers: one after another with a pause, staggered starts, and a
burst of many at once; over HTTP (the Python client) and through Ray handles (RayCave).

    python -m bench.tti                 # defaults: 20 sequential, 20 staggered, 2 bursts of 100
    CAVE_BENCH_BURST=50 CAVE_BENCH_PATHS=http python -m bench.tti

It starts its own local cluster with `cave up` (a scratch CAVE_HOME, SQLite, default settings),
so what it measures is what `make run` gives a user; the sandboxes are deleted after each
scenario, outside the timing. The burst runs twice: the first builds a sandbox per create beyond
the spares, the second finds spares prepared after the first one's deletes.
Prints, per scenario and path: successes, median, p95, p99, and the errors by code. The
leaderboard's figures (over the internet) are printed beside them.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bench.local_cluster import local_cluster, raise_quotas

SEQUENTIAL = int(os.environ.get("CAVE_BENCH_SEQUENTIAL", "20"))
STAGGERED = int(os.environ.get("CAVE_BENCH_STAGGERED", "20"))
BURST = int(os.environ.get("CAVE_BENCH_BURST", "100"))
PAUSE_S = 0.5  # between sequential creates, as the leaderboard does
STAGGER_S = 0.05  # between staggered starts
PATHS = os.environ.get("CAVE_BENCH_PATHS", "http,ray").split(",")
NAMESPACE = "tti"
# The namespace's quotas raised to the burst (an admin's PUT), so that the burst measures the
# platform, not a namespace's default quota (32 sandboxes); CAVE_BENCH_DEFAULT_QUOTAS=1 keeps them.
KEEP_QUOTAS = os.environ.get("CAVE_BENCH_DEFAULT_QUOTAS") == "1"
# The leaderboard's medians (ms) for a burst of 100 and for sequential creates, for reference.
LEADERBOARD = {"burst": "Daytona 367 ms, best 118-190 ms", "sequential": "Daytona 186, E2B 491"}


@dataclass
class Outcome:
    samples_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)

    def line(self, name: str, total: int) -> str:
        ok = len(self.samples_s)
        if not ok:
            return f"  {name:24s} 0/{total} ok  errors {dict(self.errors)}"
        ordered = sorted(self.samples_s)
        pick = lambda q: ordered[min(ok - 1, int(q * ok))] * 1000  # noqa: E731
        median = statistics.median(ordered) * 1000
        errors = f"  errors {dict(self.errors)}" if self.errors else ""
        return (
            f"  {name:24s} {ok}/{total} ok  median {median:7.1f} ms  p95 {pick(0.95):7.1f} ms"
            f"  p99 {pick(0.99):7.1f} ms{errors}"
        )


Create = Callable[[], Awaitable[str]]  # creates, runs `echo hi`, returns the sandbox id
Delete = Callable[[str], Awaitable[None]]


async def _timed(create: Create, outcome: Outcome) -> None:
    start = time.perf_counter()
    try:
        sandbox_id = await create()
    except Exception as exc:  # every failure is counted by its code, none stops the run
        outcome.errors[getattr(exc, "code", type(exc).__name__)] += 1
        return
    outcome.samples_s.append(time.perf_counter() - start)
    outcome.ids.append(sandbox_id)


async def _delete_all(delete: Delete, ids: list[str]) -> None:
    """Delete what a scenario created, retrying what is refused (a 429 under load), so that no
    sandbox of one scenario counts against the namespace's quota in the next."""
    left = list(ids)
    for _ in range(10):
        results = await asyncio.gather(*(delete(i) for i in left), return_exceptions=True)
        left = [i for i, r in zip(left, results, strict=True) if _retry(r)]
        if not left:
            return
        await asyncio.sleep(2)
    print(f"  ({len(left)} sandboxes could not be deleted)")


def _retry(result: object) -> bool:
    code = getattr(result, "code", None)
    return isinstance(result, Exception) and code not in ("not_found", "sandbox_not_found")


async def sequential(create: Create, n: int, delete: Delete) -> Outcome:
    """One at a time, each deleted (untimed) before the pause and the next."""
    outcome = Outcome()
    for _ in range(n):
        await _timed(create, outcome)
        await _delete_all(delete, outcome.ids)
        outcome.ids.clear()
        await asyncio.sleep(PAUSE_S)
    return outcome


async def staggered(create: Create, n: int, delete: Delete) -> Outcome:
    outcome = Outcome()
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(_timed(create, outcome)))
        await asyncio.sleep(STAGGER_S)
    await asyncio.gather(*tasks)
    return outcome


async def burst(create: Create, n: int, delete: Delete) -> Outcome:
    outcome = Outcome()
    await asyncio.gather(*(_timed(create, outcome) for _ in range(n)))
    return outcome


async def run_path(name: str, create: Create, delete: Delete) -> None:
    print(f"\n{name}: create + `echo hi`")
    for scenario, runner, n in (
        ("sequential", sequential, SEQUENTIAL),
        ("staggered", staggered, STAGGERED),
        ("burst", burst, BURST),
        ("burst again", burst, BURST),  # after the first's deletes: spares in their place
    ):
        if n <= 0:
            continue
        outcome = await runner(create, n, delete)
        reference = LEADERBOARD.get(scenario.split()[0], "")
        print(outcome.line(f"{scenario} of {n}", n) + (f"   (leaderboard: {reference})"))
        await _delete_all(delete, outcome.ids)


async def over_http(url: str, key: str) -> None:
    from cave.client import AsyncCave

    async with AsyncCave(url, key, timeout=300, max_retries=0) as client:

        async def create() -> str:
            sandbox = await client.sandboxes.create(namespace=NAMESPACE)
            result = await sandbox.exec(["echo", "hi"])
            assert result.stdout == "hi\n", result
            return sandbox.id

        await run_path("HTTP (cave.client.AsyncCave)", create, client.sandboxes.delete)


async def over_ray(address: str, key: str) -> None:
    import ray

    from cave.client.ray_client import RayCave

    ray.init(address=address, namespace="cave", log_to_driver=False)
    client = RayCave(key)
    # RayCave blocks: one thread per create in flight, or a burst would be a handful at a time
    # (asyncio's default executor has min(32, CPUs + 4) threads).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max(BURST, STAGGERED)))

    async def create() -> str:
        def work() -> str:
            sandbox = client.create(namespace=NAMESPACE)
            result = client.exec(sandbox["id"], ["echo", "hi"])
            assert result["stdout"] == "hi\n", result
            return str(sandbox["id"])

        return await asyncio.to_thread(work)

    async def delete(sandbox_id: str) -> None:
        await asyncio.to_thread(client.delete, sandbox_id)

    await run_path("Ray handles (cave.client.ray_client.RayCave)", create, delete)
    ray.shutdown()


def main() -> None:
    with local_cluster() as cluster:
        if not KEEP_QUOTAS:
            asyncio.run(raise_quotas(cluster, NAMESPACE, max(BURST, 20)))
        if "http" in PATHS:
            asyncio.run(over_http(cluster.url, cluster.admin_key))
        if "ray" in PATHS:
            os.environ.update(cluster.driver_env)
            asyncio.run(over_ray(cluster.driver_env["RAY_ADDRESS"], cluster.admin_key))


if __name__ == "__main__":
    main()
