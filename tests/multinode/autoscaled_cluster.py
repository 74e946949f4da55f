"""A Ray cluster with the real autoscaler, whose nodes are raylets on this machine.

`ray start --autoscaling-config` runs Ray's autoscaler (the monitor) with Ray's fake multi-node
provider, which starts a raylet where a cloud provider would start a VM. Run as a script, in a
process of its own (a driver joins one cluster per process): it fills the one sandbox node the
cluster starts with, sees a create refused, then waits for room with a second create and prints
what happened as one JSON line. tests/multinode/test_autoscaler.py runs it.

    python -m tests.multinode.autoscaled_cluster
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARKER = "CAVE_AUTOSCALED_CLUSTER"
SANDBOX_NODE = {"CPU": 2, "cave_sandbox": 1}  # one sandbox each: the second create needs a node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def autoscaling_config(gcs_address: str) -> dict[str, Any]:
    return {
        "cluster_name": "cave-autoscaled",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ray"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "sandbox": {
                "resources": SANDBOX_NODE,
                "node_config": {},
                "min_workers": 1,
                "max_workers": 3,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start(temp: Path) -> str:
    """Start the head (and with it the autoscaler); the GCS address."""
    import ray._private.services as services

    port = free_port()
    gcs = f"{services.get_node_ip_address()}:{port}"
    config = temp / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to run without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
        MARKER: str(temp),  # inherited by every process of this cluster: see stop()
    }
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run(
        [
            str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=false", f"--temp-dir={temp}", f"--autoscaling-config={config}",
        ],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    return gcs


def stop(temp: Path) -> None:
    """End this cluster's processes only, never `ray stop`, which would end every Ray cluster of
    this machine. Each of them names the temp dir in its command line, or carries the marker in
    its environment, or (agents that rename themselves and clear both) has a log file open
    there."""
    marker = f"{MARKER}={temp}".encode()
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and int(entry.name) != os.getpid()
            and _is_ours(entry, temp, marker)
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _is_ours(process: Path, temp: Path, marker: bytes) -> bool:
    try:
        if str(temp).encode() in (process / "cmdline").read_bytes():
            return True
        if marker in (process / "environ").read_bytes().split(b"\0"):
            return True
        return any(str(temp) in os.readlink(fd) for fd in (process / "fd").iterdir())
    except OSError:  # gone meanwhile, or not ours to look into
        return False


async def scenario() -> dict[str, Any]:
    import ray

    from actors import remote
    from cave.errors import CapacityError
    from config.settings import load_settings

    settings = load_settings(env={})

    def sandbox_nodes() -> list[str]:
        return [
            n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("cave_sandbox")
        ]

    deadline = time.monotonic() + 120
    while not sandbox_nodes():  # min_workers: the autoscaler starts the first one
        assert time.monotonic() < deadline, "the autoscaler started no sandbox node"
        await asyncio.sleep(0.2)
    before = sandbox_nodes()
    first = await remote.reserve("first", settings)
    try:
        await remote.reserve("second", settings)
        refused = ""
    except CapacityError as exc:
        refused = exc.message
    started = time.monotonic()
    second = await remote.reserve("second", settings, wait_s=120)
    return {
        "before": before,
        "first": first,
        "refused": refused,
        "second": second,
        "after": sandbox_nodes(),
        "waited_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    temp = Path(f"/tmp/cave-as-{os.getpid()}")  # short: Ray's socket paths live under it
    temp.mkdir(parents=True)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        gcs = start(temp)
        import ray

        ray.init(address=gcs, namespace="cave", log_to_driver=False)
        try:
            result = asyncio.run(scenario())
        finally:
            ray.shutdown()
    finally:
        stop(temp)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
