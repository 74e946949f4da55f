"""Time to interactive: create a sandbox and run its first command (`echo hi`), the way the public
sandbox leaderboard measures providers: one after another with a pause, staggered starts, and a
burst of many at once; over HTTP (the Python client) and through Ray handles (RayCave).

    python -m bench.tti                 # defaults: 20 sequential, 20 staggered, a burst of 100
    CAVE_BENCH_BURST=50 CAVE_BENCH_PATHS=http python -m bench.tti

It starts its own local cluster with `cave up` (a scratch CAVE_HOME, SQLite, default settings),
so what it measures is what `make run` gives a user; the sandboxes are deleted after each
scenario, outside the timing. Prints, per scenario and path: successes, median, p95, p99, and
the errors by code. The leaderboard's figures (over the internet) are printed beside them.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

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


async def sequential(create: Create, n: int, delete: Delete) -> Outcome:
    """One at a time, each deleted (untimed) before the pause and the next."""
    outcome = Outcome()
    for _ in range(n):
        await _timed(create, outcome)
        await asyncio.gather(*(delete(i) for i in outcome.ids), return_exceptions=True)
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
    ):
        if n <= 0:
            continue
        outcome = await runner(create, n, delete)
        reference = LEADERBOARD.get(scenario, "")
        print(outcome.line(f"{scenario} of {n}", n) + (f"   (leaderboard: {reference})"))
        await asyncio.gather(*(delete(i) for i in outcome.ids), return_exceptions=True)


async def over_http(url: str, key: str) -> None:
    from cave.client import AsyncCave

    async with AsyncCave(url, key, timeout=300, max_retries=0) as client:

        async def create() -> str:
            sandbox = await client.sandboxes.create(namespace=NAMESPACE)
            result = await sandbox.exec(["echo", "hi"])
            assert result.stdout == "hi\n", result
            return sandbox.id

        await run_path("HTTP (cave.client.AsyncCave)", create, client.sandboxes.delete)


async def _raise_quotas(url: str, key: str, sandboxes: int) -> None:
    import httpx

    quotas = {"sandboxes": sandboxes, "memory_mb": sandboxes * 8192, "cpu": sandboxes * 8.0}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        answer = await c.put(f"/api/v1/admin/namespaces/{NAMESPACE}", json={"quotas": quotas})
        answer.raise_for_status()


async def over_ray(address: str, key: str) -> None:
    import ray

    from cave.client.ray_client import RayCave

    ray.init(address=address, namespace="cave", log_to_driver=False)
    client = RayCave(key)

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


def _cave(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cluster.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cave-tti-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            CAVE_HOME=home,
            BKG_DB_PATH=f"{home}/cave.db",
            CAVE_SECRETS_DIR=f"{home}/secrets",
            CAVE_STATE_DIR=f"/run/cave-tti-{os.getpid()}",
        )
        up = _cave(env, "up")
        if up.returncode != 0:
            sys.exit(f"cave up failed:\n{up.stdout}{up.stderr}")
        try:
            api = json.loads((Path(home) / "api.json").read_text())
            # `cave up` prints `export RAY_ADDRESS=... <the cluster's token variables>`.
            exports = next(line for line in up.stdout.splitlines() if line.startswith("export "))
            driver = dict(pair.split("=", 1) for pair in exports.split()[1:])
            if not KEEP_QUOTAS:
                asyncio.run(_raise_quotas(api["url"], api["admin_key"], max(BURST, 20)))
            if "http" in PATHS:
                asyncio.run(over_http(api["url"], api["admin_key"]))
            if "ray" in PATHS:
                os.environ.update(driver)
                asyncio.run(over_ray(driver["RAY_ADDRESS"], api["admin_key"]))
        finally:
            _cave(env, "down")


if __name__ == "__main__":
    main()
