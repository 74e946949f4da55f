"""A stopped sandbox's host serves the next sandbox: no worker ends, none starts, and nothing of
the old sandbox survives (files, processes, environment, cgroup, the host's memory)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.sandbox_ref import SandboxRef, StaleTicketError
from actors.sandboxes import SandboxHandle, directory, stop_sandbox
from actors.warm_pool import NAMESPACE, WarmPool, pinned
from cave.errors import SandboxNotFoundError, SandboxStateError
from config.settings import PoolSettings, Settings, load_settings
from tests.support import poll_until

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def settings(cave_state_dir: Path) -> Settings:
    return load_settings(env={**os.environ, "CAVE_STATE_DIR": str(cave_state_dir)})


def _pool(settings: Settings, **pool: Any) -> Any:
    """A pool of its own on this node, so that its spares are the ones the test counts."""
    node = ray.get_runtime_context().get_node_id()
    # One host: every sandbox of the test shares it, as the tests of reuse need.
    wanted = PoolSettings(**{**settings.pool.model_dump(), "hosts_per_node": 1, **pool})
    return WarmPool.options(
        name=f"test-pool-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE, **pinned(node)
    ).remote(node, settings.isolation, settings.defaults, wanted)


@pytest.fixture
def pool(settings: Settings) -> Iterator[Any]:
    # No floor: every spare it holds was prepared after a stop, for the next create.
    handle = _pool(settings, size_per_node=0, max_per_node=2, idle_s=600, max_incarnations=3)
    yield handle
    ray.get(handle.drain.remote())
    ray.kill(handle)


def _create(pool: Any, settings: Settings) -> SandboxHandle:
    sandbox_id = uuid.uuid4().hex
    ref, info = ray.get(pool.create.remote(sandbox_id, settings.defaults, directory()))
    return SandboxHandle(sandbox_id, info.node_id, ref)


def _stats(pool: Any) -> dict[str, int]:
    stats: dict[str, int] = ray.get(pool.stats.remote())
    return stats


def _marked(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _cgroups(settings: Settings, slot: str) -> list[Path]:
    """The sandbox's cgroup directories: one per controller (v1) or one (v2)."""
    return list(Path("/sys/fs/cgroup").glob(f"*/{settings.isolation.cgroup_root}/{slot}")) + list(
        Path("/sys/fs/cgroup").glob(f"{settings.isolation.cgroup_root}/{slot}")
    )


def _memory_peak(dirs: list[Path]) -> int:
    for cgroup in dirs:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):  # v2, v1
            if (cgroup / name).exists():
                return int((cgroup / name).read_text())
    raise AssertionError(f"no memory accounting in {dirs}")


def _memory_of(actor: Any) -> str:
    """Everything the host's Python object holds, its sandboxes' too, as text."""

    def dump(service: Any) -> str:
        hosted = list(service._running.values())
        return (
            repr(vars(service))
            + "".join(repr(vars(h)) + repr(vars(h.sandbox)) for h in hosted)
            + "".join(repr(vars(sandbox)) for sandbox in service._standby)
        )

    text: str = ray.get(actor.__ray_call__.remote(dump))
    return text


def test_a_stopped_sandboxs_host_serves_the_next_and_keeps_nothing(
    pool: Any, settings: Settings
) -> None:
    old = _create(pool, settings)
    old_slot = old.info().slot
    marker = f"cave-recycle-{old.id}"
    old.run("mkdir -p data && echo secret > data/a.txt && echo secret > /tmp/left.txt")
    old.run("python3 -c 'b = b\"x\" * (96 << 20)'")  # a memory peak its counters keep
    sleeper = f"python3 -c 'import time; time.sleep(1000)' {marker}"
    running = old.actor.exec.remote(f"({sleeper} &); {sleeper}")  # still running at the stop
    assert old.run("cat data/a.txt", env={"TOKEN": "old-secret"}).stdout == b"secret\n"
    poll_until(lambda: _marked(marker), what="the old sandbox's background process")
    burned = _cgroups(settings, old_slot)
    assert burned
    burned_peak = _memory_peak(burned)
    assert burned_peak > 96 << 20

    old.stop()
    del running
    assert _stats(pool)["hosts_started"] == 1
    poll_until(lambda: _stats(pool)["ready"] == 1, what="a spare prepared after the stop")
    assert not _marked(marker), "a process of the stopped sandbox survived"
    assert not any(d.exists() for d in burned), "the stopped sandbox's cgroup survived"
    assert not (settings.isolation.state_dir / "sandboxes" / old_slot).exists()

    new = _create(pool, settings)
    try:
        assert new.actor.actor._actor_id == old.actor.actor._actor_id  # the same worker
        assert _stats(pool)["hosts_started"] == 1, "a worker was started for the second sandbox"
        info = new.info()
        assert info.id == new.id and info.slot != old_slot
        listing = new.run("ls -A; ls -A /tmp; env").stdout.decode()
        assert "data" not in listing.split() and "left.txt" not in listing
        assert "old-secret" not in listing and "TOKEN" not in listing
        cgroups = _cgroups(settings, info.slot)
        assert cgroups and not set(cgroups) & set(burned)
        assert _memory_peak(cgroups) < burned_peak // 2  # its counters start from nothing
        assert old.id not in _memory_of(new.actor.actor)
    finally:
        new.stop()


def test_the_old_handle_reaches_nothing_of_the_new_sandbox(pool: Any, settings: Settings) -> None:
    old = _create(pool, settings)
    old.stop()
    poll_until(lambda: _stats(pool)["ready"] == 1, what="a spare prepared after the stop")
    new = _create(pool, settings)
    try:
        assert new.actor.actor._actor_id == old.actor.actor._actor_id
        stale = old.actor  # what a replica's cache or a driver may still hold
        for call in (
            lambda: stale.run.remote("echo intruder"),
            lambda: stale.info.remote(),
            lambda: stale.read_file.remote("x"),
            lambda: stale.write_file.remote("x", b"intruder"),
            lambda: stale.list_files.remote(""),
            lambda: stale.stop.remote(),
        ):
            with pytest.raises(StaleTicketError):
                try:
                    ray.get(call())
                except ray.exceptions.RayTaskError as exc:
                    raise exc.cause from None
        with pytest.raises(SandboxStateError):  # as the driver's facade says it
            old.run("echo intruder")
        forged = SandboxRef(new.actor.actor, "a guessed ticket")
        with pytest.raises(StaleTicketError):
            try:
                ray.get(forged.run.remote("echo intruder"))
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause from None
        assert new.run("ls -A").stdout == b""  # nothing written by the stale calls
        with pytest.raises(AttributeError):
            new.actor.prepare  # noqa: B018 (not a sandbox method: a ref does not offer it)
    finally:
        new.stop()
    with pytest.raises(SandboxNotFoundError):  # stopping twice: the second finds it gone
        stop_sandbox(new.id)


def test_the_pool_keeps_at_most_its_ceiling(pool: Any, settings: Settings) -> None:
    sandboxes = [_create(pool, settings) for _ in range(3)]
    assert _stats(pool)["hosts_started"] == 1  # a few sandboxes share one host
    for sandbox in sandboxes:
        sandbox.stop()
    poll_until(lambda: _stats(pool)["ready"] == 2, what="two spares (its ceiling)")
    assert _stats(pool)["prepared"] == 2  # none for the third stop
    again = [_create(pool, settings) for _ in range(2)]
    stats = _stats(pool)
    assert stats["ready"] == 0 and stats["prepared"] == 2  # both took the prepared spares
    for sandbox in again:
        sandbox.stop()


def test_a_worn_host_is_ended_not_reused(settings: Settings) -> None:
    pool = _pool(settings, size_per_node=0, max_per_node=1, idle_s=600, max_incarnations=2)
    try:
        first = _create(pool, settings)
        actor_id = first.actor.actor._actor_id
        first.stop()
        poll_until(lambda: _stats(pool)["ready"] == 1, what="a spare after the stop")
        second = _create(pool, settings)
        assert second.actor.actor._actor_id == actor_id
        second.stop()  # the host's second sandbox: max_incarnations reached
        poll_until(lambda: _stats(pool)["hosts_retired"] == 1, what="the worn host ended")
        poll_until(lambda: _actor_dead(actor_id), what="the worn host's worker gone")
        third = _create(pool, settings)  # from the spare prepared in a new host
        assert third.actor.actor._actor_id != actor_id
        assert _stats(pool)["hosts_started"] == 2
        third.stop()
    finally:
        ray.get(pool.drain.remote())
        ray.kill(pool)


def test_a_host_runs_many_sandboxes_apart(pool: Any, settings: Settings) -> None:
    a, b = _create(pool, settings), _create(pool, settings)
    try:
        assert a.actor.actor._actor_id == b.actor.actor._actor_id  # one worker for both
        a.run("echo a-secret > mine")
        assert b.run("ls -A; hostname").stdout.decode().split()[:1] != ["mine"]
        assert a.info().slot != b.info().slot
        a.stop()  # b goes on
        assert b.run("echo alive").stdout == b"alive\n"
        with pytest.raises(SandboxStateError):
            a.run("true")
    finally:
        b.stop()


def _actor_dead(actor_id: Any) -> bool:
    entry = ray._private.state.actors(actor_id.hex())
    return bool(entry["State"] == "DEAD")


def test_an_idle_pool_shrinks_to_its_floor(settings: Settings) -> None:
    pool = _pool(settings, size_per_node=1, max_per_node=3, idle_s=10, max_incarnations=10)
    try:
        sandboxes = [_create(pool, settings) for _ in range(3)]
        for sandbox in sandboxes:
            sandbox.stop()
        # Three creates within idle_s: the pool prepares a spare after each stop, up to its
        # ceiling...
        poll_until(lambda: _stats(pool)["ready"] == 3, what="the pool grown to its ceiling")
        # ...and once idle_s passes without a create, goes back to its floor of 1 (trimmed
        # every few seconds; asked here, so that the test need not wait for the next round).
        poll_until(lambda: _stats(pool)["target"] == 1, timeout_s=60, what="demand gone")
        ray.get(pool.trim.remote())
        assert _stats(pool)["ready"] == 1
    finally:
        ray.get(pool.drain.remote())
        ray.kill(pool)


def test_a_stop_through_a_stale_handle_stops_the_current_incarnation(settings: Settings) -> None:
    # A replica cached the handle of a sandbox that another replica stopped and started again
    # (same id, another actor or ticket): its delete must stop what runs now, not leave it
    # running unregistered, nor stop another tenant's sandbox on the recycled actor.
    from actors import remote
    from actors.sandboxes import create_sandbox, get_sandbox

    first = create_sandbox(settings)
    stale = first.actor
    first.stop()
    again = create_sandbox(settings, sandbox_id=first.id)
    other = create_sandbox(settings)  # may run in first's host
    try:
        info = asyncio.run(remote.stop(first.id, stale))
        assert info is not None and info.id == first.id and info.state == "stopped"
        with pytest.raises(SandboxNotFoundError):
            get_sandbox(first.id)
        with pytest.raises(SandboxStateError):
            again.run("true")
        assert other.run("echo untouched").stdout == b"untouched\n"
    finally:
        other.stop()


def test_a_dead_host_loses_its_sandboxes_and_the_pool_goes_on(settings: Settings) -> None:
    from actors import remote

    pool = _pool(settings, size_per_node=1, max_per_node=2, idle_s=600, max_incarnations=10)
    try:
        a, b = _create(pool, settings), _create(pool, settings)
        host = a.actor.actor
        assert b.actor.actor._actor_id == host._actor_id
        poll_until(lambda: _stats(pool)["ready"] == 1, what="the floor's spare, in that host")
        ray.kill(host)  # a crash: no stop
        poll_until(lambda: _actor_dead(host._actor_id), what="the host gone")
        assert asyncio.run(remote.dead_ids([a.id, b.id])) == {a.id, b.id}
        for sandbox in (a, b):
            with pytest.raises(SandboxStateError):
                sandbox.run("true")
        c = _create(pool, settings)  # the dead host's spare is dropped, a new host serves
        try:
            assert c.actor.actor._actor_id != host._actor_id
            assert c.run("echo fine").stdout == b"fine\n"
            assert _stats(pool)["hosts"] == 1
        finally:
            c.stop()
    finally:
        ray.get(pool.drain.remote())
        ray.kill(pool)
