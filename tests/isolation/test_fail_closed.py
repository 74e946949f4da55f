"""Isolation fails closed: production refuses less than namespaces + seccomp + cgroups, bwrap never
runs without cgroups, development degrades loudly, and each sandbox says what it really got.

The broken hosts are real: a child process gets a mount namespace of its own where every cgroup
hierarchy is read-only, as in a container to which the host delegated no cgroups. Everything
else (namespaces, bwrap, seccomp) works there, so only the cgroups are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors.isolation.backend import Backend
from actors.sandbox_actor import SandboxService
from tests.isolation.conftest import (
    LIMITS,
    TEST_ROOT,
    async_test,
    cgroup_dirs,
    isolation_env,
    open_sandbox,
    run,
)

ROOT = str(Path(__file__).resolve().parents[2])

# Runs in the child: make every cgroup hierarchy read-only in a private mount namespace, then
# do what argv[1] (a JSON [scenario, env]) asks and print one JSON line of what happened.
_CHILD = r"""
import asyncio, json, logging, os, sys
from datetime import datetime, timezone
from actors.isolation import syscalls as sc
from actors.isolation.cgroups import read_mounts

sc.unshare(sc.CLONE_NEWNS)
sc.mount("none", "/", None, sc.MS_REC | sc.MS_PRIVATE)
for m in read_mounts():
    sc.mount("none", m.path, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY)

from actors.isolation.backend import select_backend
from actors.sandbox_actor import SandboxService
from actors.warm_pool import PoolService
from cave.db import SandboxRow
from cave.errors import IsolationUnavailableError
from config.settings import SandboxLimits, load_settings
from deployments.sandboxes.views import sandbox_out

scenario, env = json.loads(sys.argv[1])
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("cave.isolation").addHandler(handler)
settings = load_settings(env=env)
limits = SandboxLimits(memory_mb=256, pids=64, cpu=1, disk_mb=64, timeout_s=30, output_bytes=1<<20)
out = {}

def refused(call):
    try:
        call()
    except IsolationUnavailableError as exc:
        return str(exc)
    return None

async def dev():
    service = SandboxService(settings.isolation)
    info = await service.start("sb-dev", limits, "t")
    output = await service.run("t", ["echo", "ran"])
    await service.stop("t")
    row = SandboxRow(
        id="sb-dev", name="", namespace_id="default", state="running", limits=limits.model_dump(),
        labels={}, created_at=datetime.now(timezone.utc), updated_at=datetime.now(timezone.utc),
        isolation=info.isolation.as_dict(),
    )
    return {"stdout": output.stdout.decode(), "out": sandbox_out(row).isolation.model_dump()}

if scenario == "production":
    out["select"] = refused(lambda: select_backend(settings.isolation))
    out["service"] = refused(lambda: SandboxService(settings.isolation))
    pool = PoolService("node-1", settings.isolation, settings.defaults, settings.pool)
    pool.refill()  # what the pool actor does at its start: it must not raise, nor start spares
    out["create"] = refused(lambda: asyncio.run(pool.create("sb-1", limits, None)))
    out["report"] = refused(pool.isolation_report)
    out["stats"] = pool.stats()
elif scenario == "select":
    out["select"] = refused(lambda: select_backend(settings.isolation))
    if out["select"] is None:
        out["backend"] = select_backend(settings.isolation).isolation.as_dict()
else:
    out.update(asyncio.run(dev()))
    pool = PoolService("n", settings.isolation, settings.defaults, settings.pool)
    out["pool_report"] = pool.isolation_report().as_dict()
out["warnings"] = warnings
print(json.dumps(out))
"""


def _in_broken_host(scenario: str, **variables: str) -> dict[str, Any]:
    """Run one scenario in a child whose cgroup hierarchies are read-only; its JSON report."""
    state = TEST_ROOT / f"ro-{uuid.uuid4().hex[:8]}"
    env = isolation_env(
        CAVE_STATE_DIR=str(state),
        CAVE_CGROUP_ROOT=f"cave-ro-{uuid.uuid4().hex[:8]}",  # never made: mkdir must fail
        **variables,
    )
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps([scenario, env])],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
            timeout=120,
        )
        assert child.returncode == 0, child.stderr.decode()[-3000:]
        report: dict[str, Any] = json.loads(child.stdout.decode().strip().splitlines()[-1])
        sandboxes = state / "sandboxes"
        report["sandbox_dirs"] = sorted(os.listdir(sandboxes)) if sandboxes.is_dir() else []
        return report
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_production_refuses_a_node_without_cgroups_and_runs_no_sandbox() -> None:
    report = _in_broken_host("production", CAVE_ENV="production")
    for step in ("select", "service", "create", "report"):
        assert report[step] is not None, f"{step} was not refused"
        assert "CAVE_ENV=production requires namespaces, seccomp and cgroups" in report[step]
        assert "Read-only file system" in report[step]  # the reason, in the kernel's words
    assert report["stats"]["hosts_started"] == 0 and report["stats"]["ready"] == 0
    assert report["stats"]["refused"] == 1
    assert report["sandbox_dirs"] == []  # no sandbox was even prepared


def test_production_refuses_even_with_no_fallback_turned_off() -> None:
    report = _in_broken_host("select", CAVE_ENV="production", CAVE_ISOLATION_NO_FALLBACK="false")
    assert report["select"] is not None and "CAVE_ENV=production" in report["select"]


def test_bwrap_is_never_used_without_cgroups() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed (the bwrap tests need it)")
    forced = _in_broken_host(
        "select", CAVE_ISOLATION_BACKEND="bwrap", CAVE_ISOLATION_NO_FALLBACK="true"
    )
    assert forced["select"] is not None
    assert "bubblewrap is never used without memory, pids and CPU limits" in forced["select"]
    # auto, allowed to degrade: it does not settle for bwrap without cgroups either.
    auto = _in_broken_host("select")
    assert auto["select"] is None
    assert auto["backend"]["backend"] == "none" and auto["backend"]["degraded"] is True
    assert "bubblewrap is never used without" in auto["backend"]["reason"]


def test_development_degrades_loudly_and_every_sandbox_says_so() -> None:
    report = _in_broken_host("dev")
    assert report["stdout"] == "ran\n"  # the sandbox runs...
    shown = report["out"]  # ...and its SandboxOut says what it lacks, and why
    assert shown["backend"] == "none" and shown["degraded"] is True
    assert shown["guarantees"] == {
        "namespaces": False,
        "seccomp": True,
        "cgroups": False,
        "overlayfs": False,
    }
    assert "Read-only file system" in shown["reason"]
    assert report["pool_report"]["degraded"] is True  # what readiness and metrics report
    assert any("CAVE IS RUNNING SANDBOXES WITHOUT ISOLATION" in w for w in report["warnings"])
    assert any("sandbox sb-dev runs with degraded isolation" in w for w in report["warnings"])
    assert report["sandbox_dirs"] == []  # stopped and cleaned up


def test_the_normal_path_reports_full_guarantees(backend: Backend) -> None:
    assert backend.isolation.as_dict() == {
        "backend": "builtin",
        "reason": None,
        "guarantees": {"namespaces": True, "seccomp": True, "cgroups": True, "overlayfs": True},
        "degraded": False,
    }


@async_test
async def test_the_actor_reports_the_isolation_of_the_sandbox_it_runs(backend: Backend) -> None:
    from config.settings import load_settings

    service = SandboxService(load_settings(env=isolation_env()).isolation)
    try:
        info = await service.start("sb-full", LIMITS, "t")
        assert info.isolation is not None and info.isolation == backend.isolation
        assert not info.isolation.degraded
    finally:
        await service.stop("t")
    async with open_sandbox(backend) as sandbox:  # what it says holds: its cgroup is there
        assert cgroup_dirs(sandbox.id), "a fully isolated sandbox without its cgroup"
        out, _, _ = await run(sandbox, "echo ok")
        assert out == b"ok\n"
