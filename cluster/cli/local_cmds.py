"""`cave up` and `cave down`: the local cluster, its warm pool and the API, through Ray."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import cast

import ray

from actors.isolation.guarantees import Isolation
from actors.sandboxes import choose_node, directory, warm_pool
from cluster.api import API_FILE, deploy_api, forget_api
from cluster.cli.base import cave_home
from cluster.cli.session import connected
from cluster.local import (
    ClusterInfo,
    driver_env,
    running_cluster,
    start_local_cluster,
    stop_local_cluster,
)
from config.settings import Settings, load_settings

PREWARM_TIMEOUT_S = 60.0


def up(args: argparse.Namespace) -> int:
    settings = load_settings()  # a bad setting fails before anything starts
    started = time.monotonic()
    home = cave_home()
    was_running = running_cluster(home) is not None
    info = start_local_cluster(home, args.num_cpus)
    with connected(info.address):
        stats = _prewarm(settings)
        api = deploy_api(home, os.environ, Path.cwd())
    _print_up(info, stats, was_running, time.monotonic() - started)
    print(f"API: {api.url}  (docs {api.url}/docs, MCP {api.url}/mcp)")
    print(f"admin key: {api.admin_key}  (also in {home / API_FILE}; keep it secret)")
    return 0


def _prewarm(settings: Settings) -> dict[str, int]:
    """Create the head node's warm pool and wait, bounded, until its sandboxes are prepared.

    A node that cannot isolate (CAVE_ENV=production) fails `cave up` with the reason; a
    degraded one is said so on stderr.
    """
    pool = warm_pool(choose_node(), settings)
    ray.get(directory().ids.remote())  # started now, not by the first create
    isolation: Isolation = ray.get(pool.isolation_report.remote())
    if isolation.degraded:
        print(f"cave: warning: sandboxes are NOT isolated: {isolation.describe()}", file=sys.stderr)
    deadline = time.monotonic() + PREWARM_TIMEOUT_S
    while True:
        stats = cast(dict[str, int], ray.get(pool.stats.remote()))
        if stats["ready"] >= stats["size"] or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _print_up(info: ClusterInfo, stats: dict[str, int], was_running: bool, took_s: float) -> None:
    state = "already running" if was_running else f"started in {took_s:.1f} s"
    print(f"CAVE cluster {state} at {info.address} (pid {info.pid}, log {info.log})")
    print(f"warm pool: {stats['ready']} of {stats['size']} sandboxes ready")
    if stats["ready"] < stats["size"]:
        print(
            f"cave: warning: the warm pool is not full after {PREWARM_TIMEOUT_S:g} s; "
            f"see {info.log} and Ray's logs",
            file=sys.stderr,
        )
    variables = {"RAY_ADDRESS": info.address, **driver_env(info)}
    print("export " + " ".join(f"{k}={v}" for k, v in variables.items()))


def down(args: argparse.Namespace) -> int:
    forget_api(cave_home())
    stopped = stop_local_cluster(cave_home())
    print("CAVE cluster stopped" if stopped else "no CAVE cluster was running")
    return 0
