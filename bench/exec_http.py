"""Exec of `true` over HTTP: this checkout next to an earlier commit, and fresh bwrap, in one run.

`python -m bench.exec_http [--baseline REF]` checks REF out into a scratch worktree (default:
`BASELINE_REF`, main before issue 11's allowlist, limits and quotas), starts one local cluster
per tree with `cave up`'s code and default ingress (HAProxy, tuned), serves each tree's own CAVE
app there (`bench.api_cave` of that tree: its own database, admin key and warm pool), and runs
`POST /api/v1/sandboxes/{id}/exec {"command": ["true"]}` on both in interleaved rounds, with a
fresh `bwrap --unshare-all ... true` timed between them in this process. Prints p50/p99, the
server CPU per request and the ratios; the issue 11 figure is current / baseline p50, at most 1.10.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench import http_load
from bench.api_ingress import READY_TIMEOUT_S, REPO, Bench, load
from bench.exec_latency import BWRAP, spawn
from bench.http_load import LoadResult, Scenario
from cluster.ingress import listen_ports

BASELINE_REF = "67a507d"  # main on 2026-11-27, before issue 11
TARGET = "bench.api_cave:CAVE"
# The default ingress (HAProxy, tuned) for both: Bench.start_cluster reads it off the name.
CLUSTERS = {"current": "haproxy-tuned", "baseline": "haproxy-baseline-tuned"}
SCENARIO = "exec true (JSON result)"
MAX_RATIO = 1.10


def bwrap_result(n: int) -> LoadResult:
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        began = time.perf_counter()
        spawn(BWRAP)
        samples.append(time.perf_counter() - began)
    return LoadResult(samples, [], time.perf_counter() - start)


async def measure(bench: Bench, urls: dict[str, str], rounds: int, n: int) -> dict[str, LoadResult]:
    """`n` execs on each server and `n` fresh bwraps, in rounds whose order rotates."""
    scenarios = {}
    for setup in urls:
        made = load(bench.target.scenarios)(bench.contexts[CLUSTERS[setup]])
        op = next(s.op for s in made if s.name == SCENARIO)
        scenarios[setup] = Scenario(SCENARIO, op, clients=1, requests=n, warmup=20)
    order = [*urls, "bwrap"]
    parts: dict[str, list[LoadResult]] = {setup: [] for setup in order}
    per_round = max(1, n // rounds)
    for r in range(rounds):
        for setup in order[r % len(order) :] + order[: r % len(order)]:
            if setup == "bwrap":
                parts[setup].append(bwrap_result(per_round))
                continue
            meter = bench.cpu_meter(setup, CLUSTERS[setup])
            result = await http_load.run_scenario(urls[setup], scenarios[setup], per_round, meter)
            parts[setup].append(result)
    return {setup: LoadResult.merge(results) for setup, results in parts.items()}


def report(results: dict[str, LoadResult], baseline_ref: str) -> None:
    stats = {setup: r.stats() for setup, r in results.items()}
    bwrap = stats["bwrap"]["p50_ms"]
    print(f"\nexec of `true`, {len(results['current'].samples_s)} each, interleaved rounds")
    for setup, row in stats.items():
        errors = results[setup].errors
        cpu = "" if setup == "bwrap" else f"  server CPU {row['cpu_ms_per_req']:6.2f} ms/req"
        line = f"  {setup:10s} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        line += f"  x{row['p50_ms'] / bwrap:.2f} of fresh bwrap{cpu}"
        print(line + (f"  ERRORS {len(errors)}: {errors[0]}" if errors else ""))
    ratio = stats["current"]["p50_ms"] / stats["baseline"]["p50_ms"]
    cpu_ratio = stats["current"]["cpu_ms_per_req"] / stats["baseline"]["cpu_ms_per_req"]
    verdict = "met" if ratio <= MAX_RATIO else "NOT met"
    print(
        f"current / baseline ({baseline_ref}): p50 x{ratio:.2f}, server CPU x{cpu_ratio:.2f}"
        f" (no regression over {MAX_RATIO - 1:.0%}: {verdict})"
    )


def run(baseline_ref: str, rounds: int, n: int) -> None:
    state = Path(os.environ.get("CAVE_BENCH_STATE_DIR", "/run/cave-bench"))
    with tempfile.TemporaryDirectory(prefix="cave-baseline-") as scratch:
        tree = Path(scratch) / "tree"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), baseline_ref], check=True)
        try:
            with Bench(TARGET, state / f"exec-http-{os.getpid()}") as bench:
                urls = serve_both(bench, {"current": REPO, "baseline": tree})
                results = asyncio.run(measure(bench, urls, rounds, n))
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
    report(results, baseline_ref)


def serve_both(bench: Bench, trees: dict[str, Path]) -> dict[str, str]:
    """A cluster per tree, each serving its tree's app; the base URL of each."""
    urls = {}
    for (setup, tree), port in zip(trees.items(), listen_ports(len(trees)), strict=True):
        started = time.monotonic()
        bench.start_cluster(CLUSTERS[setup], tree)
        urls[setup] = bench.serve(setup, port, CLUSTERS[setup])
        asyncio.run(http_load.wait_ready(urls[setup] + bench.target.ready_path, READY_TIMEOUT_S))
        print(f"{setup} ({tree}) serving at {urls[setup]} in {time.monotonic() - started:.0f} s")
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE_REF, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=int(os.environ.get("CAVE_BENCH_N", "300")))
    args = parser.parse_args()
    run(args.baseline, args.rounds, args.n)


if __name__ == "__main__":
    main()
