"""Sandbox demand drives the node count: Ray's real autoscaler adds a sandbox node for a create
that waits for room (tests/multinode/autoscaled_cluster.py, in a process of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_ray_autoscaler_adds_a_sandbox_node_for_a_waiting_create() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.multinode.autoscaled_cluster"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])

    (node,) = result["before"]  # the cluster starts with one sandbox node, of one slot
    assert result["first"] == node
    assert "no node of pool 'default' has room" in result["refused"]  # full: refused at once
    assert result["second"] not in result["before"]  # the node the autoscaler added
    assert set(result["after"]) == {node, result["second"]}
