"""A simulated multi-node Ray cluster with the CAVE API on it, for this package's own session.

`ray.cluster_utils.Cluster` starts a head, two sandbox nodes (the `cave_sandbox` resource says how
many sandboxes each takes) and a node with one logical GPU, as separate raylets on this machine.
A driver connects to one cluster per process, so `make test` runs this package as a pytest
session of its own (tests/conftest.py keeps it out of the main session).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import api_env
from tests.inference.tiny_model import build_tiny_model
from tests.support import poll_until

SLOTS = 3  # sandboxes per sandbox node
GPU_MODEL = "tiny-gpu"
# Ray notices a dead node after period x threshold; its defaults take about fifteen seconds.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MultiNode:
    cluster: Any  # ray.cluster_utils.Cluster
    url: str
    admin_key: str
    env: dict[str, str]
    sandbox_nodes: dict[str, Any]  # node id -> the cluster's node object
    gpu_node: str
    extra: list[Any] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120.0)

    def add_sandbox_node(self, slots: int, labels: dict[str, str] | None = None) -> str:
        node = self.cluster.add_node(
            num_cpus=2, resources={"cave_sandbox": slots}, labels=labels or {}
        )
        self.extra.append(node)
        return str(node.node_id)


@pytest.fixture(scope="session")
def multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cave.auth.bootstrap import create_admin_key
    from deployments.http.app import APP_NAME, build_app

    state_dir = Path(f"/run/cave-multinode-{os.getpid()}")
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "include_dashboard": False,
            "gcs_server_port": free_port(),
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    nodes = [cluster.add_node(num_cpus=2, resources={"cave_sandbox": SLOTS}) for _ in range(2)]
    gpu = cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, namespace="cave", log_to_driver=False)

    root = tmp_path_factory.mktemp("multinode")
    env = {**api_env(root, state_dir), "CAVE_POOL_SIZE": "1"}
    admin_key = asyncio.run(create_admin_key({**os.environ, **env}))
    models = [
        {
            "model_id": GPU_MODEL,
            "engine": "cpu",
            "source": str(build_tiny_model(root / "tiny")),
            "num_gpus": 1,
        }
    ]
    port = free_port()
    # One proxy, on the head: every "node" here shares this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"env": env, "models": models}), name=APP_NAME, route_prefix="/")
    setup = MultiNode(
        cluster,
        f"http://127.0.0.1:{port}",
        admin_key,
        env,
        {str(n.node_id): n for n in nodes},
        str(gpu.node_id),
    )
    with setup.client() as client:
        poll_until(lambda: client.get("/readyz").status_code == 200, timeout_s=120)
    yield setup
    from actors.sandboxes import stop_all

    serve.shutdown()
    stop_all()
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(state_dir, ignore_errors=True)
