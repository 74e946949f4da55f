"""The attack of issue 11 on a real Ray head started as cluster/deploy/ray-cluster.yaml starts
it (RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH of its `ray start` line): a job submitted without the
token, which would have read every secret of the head, is refused, and so is a driver."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.manifests import DEPLOY, REPO, load_yaml
from tests.cluster.test_deploy_security import _ray_start_env

RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Head:
    def __init__(self, gcs: int, dashboard: int, token: str) -> None:
        self.gcs, self.url, self.token = gcs, f"http://127.0.0.1:{dashboard}", token


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    root = Path(f"/tmp/cave-rt-{os.getpid()}")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    token_file = tmp_path_factory.mktemp("token") / "ray-auth-token"
    token_file.write_text(token)
    token_file.chmod(0o400)
    (start,) = [
        c
        for c in load_yaml(DEPLOY / "ray-cluster.yaml")["head_start_ray_commands"]
        if "ray start" in c
    ]
    launcher = _ray_start_env(start)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE=launcher["RAY_AUTH_MODE"], RAY_AUTH_TOKEN_PATH=str(token_file))
    ports = _free_ports(9)
    names = [
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
    ]
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={root}",
        "--disable-usage-stats",
    ]
    command += [f"--{name}={port}" for name, port in zip(names, ports, strict=True)]
    # A process group of its own: the teardown ends exactly these processes, no other Ray.
    process = subprocess.Popen(
        command,
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        served = Head(ports[0], ports[1], token)
        _wait_for(lambda: httpx.get(f"{served.url}/api/authentication_mode").is_success)
        yield served
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        _wait_for(lambda: not _group_alive(process.pid))
        shutil.rmtree(root, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


def _wait_for(ready: object, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if ready():  # type: ignore[operator]
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("the Ray head did not come up (or go) in time")


def test_a_job_without_the_token_is_refused_and_never_runs(head: Head) -> None:
    job = {"entrypoint": "env > /tmp/stolen-secrets"}
    refused = httpx.post(f"{head.url}/api/jobs/", json=job)
    assert refused.status_code == 401
    wrong = httpx.post(f"{head.url}/api/jobs/", json=job, headers={"Authorization": "Bearer x"})
    assert wrong.status_code in (401, 403)
    listed = httpx.get(f"{head.url}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"})
    assert listed.status_code == 200 and listed.json() == []  # the token works; no job ran


def test_a_driver_without_the_token_cannot_join(head: Head) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code = f"import ray; ray.init(address='127.0.0.1:{head.gcs}'); print('JOINED')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "JOINED" not in result.stdout
    assert "Authentication token is missing or incorrect" in result.stderr
