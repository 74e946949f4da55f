"""Benchmark helpers: percentiles, a local Ray cluster, settings in a scratch state dir."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from config.settings import Settings, load_settings


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "mean_ms": statistics.mean(ordered) * 1000}


def timed(fn: Callable[[], object], n: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def report(rows: dict[str, dict[str, float]], baseline: str | None = None) -> None:
    base = rows[baseline]["p50_ms"] if baseline else None
    for name, stats in rows.items():
        ratio = f"  x{stats['p50_ms'] / base:.2f} of {baseline}" if base else ""
        print(f"{name:48s} p50 {stats['p50_ms']:8.2f} ms  p99 {stats['p99_ms']:8.2f} ms{ratio}")


def bench_settings(**env: str) -> Settings:
    state = Path(os.environ.get("CAVE_BENCH_STATE_DIR", "/run/cave-bench"))
    return load_settings(env={**os.environ, "CAVE_STATE_DIR": str(state), **env})


def start_ray() -> None:
    import ray

    ray.init(
        address="local", num_cpus=8, include_dashboard=False, namespace="cave", log_to_driver=False
    )


def stop_ray() -> None:
    import ray

    from actors.sandboxes import stop_all

    stop_all()  # the pool's spares release their cgroups and directories
    ray.shutdown()


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = (int(stat[stat.rindex(")") + 2 :].split()[1]), cmd)
    return found
