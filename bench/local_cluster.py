"""A scratch CAVE cluster from `cave up` (its own CAVE_HOME, SQLite, default settings unless the
caller overrides some), for benches that measure what `make run` gives a user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalCluster:
    url: str
    admin_key: str
    driver_env: dict[str, str]  # RAY_ADDRESS and the cluster's token variables, for a driver


def _cave(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cluster.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@contextmanager
def local_cluster(**settings: str) -> Iterator[LocalCluster]:
    """`cave up` with these CAVE_* variables on top of the defaults; `cave down` at the end."""
    state_dir = f"/run/cave-bench-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="cave-bench-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            CAVE_HOME=home,
            BKG_DB_PATH=f"{home}/cave.db",
            CAVE_SECRETS_DIR=f"{home}/secrets",
            CAVE_STATE_DIR=state_dir,
            **settings,
        )
        up = _cave(env, "up")
        if up.returncode != 0:
            sys.exit(f"cave up failed:\n{up.stdout}{up.stderr}")
        try:
            api = json.loads((Path(home) / "api.json").read_text())
            # `cave up` prints `export RAY_ADDRESS=... <the cluster's token variables>`.
            exports = next(line for line in up.stdout.splitlines() if line.startswith("export "))
            driver = dict(pair.split("=", 1) for pair in exports.split()[1:])
            yield LocalCluster(api["url"], api["admin_key"], driver)
        finally:
            _cave(env, "down")
            shutil.rmtree(state_dir, ignore_errors=True)  # its cave-exec build and sandbox dirs


async def raise_quotas(cluster: LocalCluster, namespace: str, sandboxes: int) -> None:
    """An admin's PUT: the namespace's quotas made room for `sandboxes`, so that a bench measures
    the platform, not a namespace's default quota."""
    import httpx

    quotas = {
        "sandboxes": sandboxes,
        "memory_mb": sandboxes * 8192,
        "cpu": sandboxes * 8.0,
        "concurrent_execs": sandboxes * 2,
    }
    headers = {"Authorization": f"Bearer {cluster.admin_key}"}
    async with httpx.AsyncClient(base_url=cluster.url, headers=headers) as client:
        answer = await client.put(f"/api/v1/admin/namespaces/{namespace}", json={"quotas": quotas})
        answer.raise_for_status()
