"""Session-wide fixtures: one real local Ray cluster for every test that needs Ray."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

MULTINODE = Path(__file__).parent / "multinode"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/multinode runs its own multi-node Ray cluster, and a driver joins one cluster per
    process: it is a session of its own (`pytest tests/multinode`, which `make test` runs)."""
    if collection_path != MULTINODE:
        return None
    asked = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return not any(path == MULTINODE or MULTINODE in path.parents for path in asked)


@pytest.fixture(scope="session")
def ray_cluster(cave_state_dir: Path) -> Iterator[None]:
    import ray

    from cluster.ingress import ingress_env

    # Serve's ingress settings must be in the environment of the processes ray.init starts.
    files = Path(f"/tmp/cave-haproxy-test-{os.getpid()}")
    os.environ.update(ingress_env(os.environ, files))
    # address="local": never attach to a `cave up` cluster that may run on this machine.
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, namespace="cave", log_to_driver=False
    )
    yield
    from actors.sandboxes import stop_all

    stop_all()  # spares and sandboxes release their cgroups and directories before Ray goes
    ray.shutdown()
    shutil.rmtree(cave_state_dir, ignore_errors=True)
    shutil.rmtree(files, ignore_errors=True)


@pytest.fixture(scope="session")
def cave_state_dir() -> Path:
    path = Path(f"/run/cave-test-{os.getpid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path
