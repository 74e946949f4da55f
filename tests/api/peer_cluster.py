"""A second local Ray cluster with its own CAVE app, deployed by a driver in a subprocess.

The test process is already a driver of the session's cluster, and a process can be the driver
of one cluster only; so the app is deployed by `python -m tests.api.peer_cluster CONFIG`, which
connects to the other cluster, deploys, and exits (Serve keeps the app running there).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.ingress import listen_ports
from cluster.local import ClusterInfo, driver_env, start_local_cluster, stop_local_cluster

REPO = Path(__file__).resolve().parents[2]
APP_NAME = "cave-b"
DEPLOY_TIMEOUT_S = 180


@dataclass(frozen=True)
class OtherCluster:
    info: ClusterInfo
    url: str  # its API's base URL, through its own ingress


def start_other_cluster(state_dir: Path, app: dict) -> OtherCluster:
    """Start a cluster in its own process tree and deploy the app `app` ({env, models}) on it."""
    info = start_local_cluster(state_dir, num_cpus=2)
    try:
        port = listen_ports(1)[0]
        config = state_dir / "app.json"
        config.write_text(json.dumps({"port": port, "app": app}))
        with (state_dir / "deploy.log").open("wb") as log:
            done = subprocess.run(
                [sys.executable, "-m", "tests.api.peer_cluster", str(config)],
                cwd=REPO,
                env=_driver_env(info),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=DEPLOY_TIMEOUT_S,
            )
        if done.returncode != 0:
            tail = (state_dir / "deploy.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"deploying on {info.address} failed:\n{tail}")
    except BaseException:
        stop_local_cluster(state_dir)
        raise
    return OtherCluster(info, f"http://127.0.0.1:{port}")


def _driver_env(info: ClusterInfo) -> dict[str, str]:
    """This process's environment, but Serve's settings those of the other cluster's `ray start`
    (Serve reads them in every process, the driver's too), and its address and token."""
    own = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS"))}
    own.pop("RAY_AUTH_TOKEN", None)
    raw = Path(f"/proc/{info.pid}/environ").read_bytes().decode(errors="replace")
    started = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    serve_env = {k: v for k, v in started.items() if k.startswith("RAY_SERVE_")}
    return {**own, **serve_env, **driver_env(info), "RAY_ADDRESS": info.address}


def _deploy(config_path: str) -> None:
    import ray
    from ray import serve

    from actors.warm_pool import NAMESPACE
    from deployments.http.app import build_app

    config = json.loads(Path(config_path).read_text())
    ray.init(
        address=os.environ["RAY_ADDRESS"],
        namespace=NAMESPACE,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": config["port"]})
    serve.run(build_app(config["app"]), name=APP_NAME, route_prefix="/")


if __name__ == "__main__":
    _deploy(sys.argv[1])
