"""Session-wide fixtures: one real local Ray cluster for every test that needs Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    import ray

    # address="local": never attach to a `cave up` cluster that may run on this machine.
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, namespace="cave", log_to_driver=False
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def cave_state_dir() -> Path:
    path = Path(f"/run/cave-test-{os.getpid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path
