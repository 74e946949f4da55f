"""The Ray-side client, from a driver of the same cluster: through the deployment and direct."""

from __future__ import annotations

import pytest
import ray

from cave.client.ray_client import RayCave
from cave.errors import AuthError, SandboxNotFoundError
from tests.api.conftest import ApiServer


def test_lifecycle_through_the_deployment_handle(api_server: ApiServer) -> None:
    cave = RayCave(api_server.admin_key)
    sandbox = cave.create(name="ray-client", limits={"memory_mb": 128})
    try:
        assert sandbox["state"] == "running"
        cave.write_file(sandbox["id"], "in.txt", b"from ray\n")
        ran = cave.exec(sandbox["id"], "cat in.txt")
        assert (ran["exit_code"], ran["stdout"]) == (0, "from ray\n")
        assert cave.read_file(sandbox["id"], "in.txt") == b"from ray\n"
        output = ray.get(cave.actor(sandbox["id"]).run.remote("echo direct"))
        assert output.stdout == b"direct\n"
    finally:
        cave.delete(sandbox["id"])
    with pytest.raises(SandboxNotFoundError):
        cave.get(sandbox["id"])


def test_a_bad_key_is_refused(api_server: ApiServer) -> None:
    cave = RayCave("cave_live_nope")
    with pytest.raises(AuthError):
        cave.list()
