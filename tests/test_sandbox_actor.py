"""Sandbox actors on a real local Ray cluster: pool, placement, streaming, files, stop, errors."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.isolation.results import ExecResult, ExecStarted, OutputChunk
from actors.sandboxes import (
    SandboxHandle,
    choose_node,
    create_sandbox,
    get_sandbox,
    stop_sandbox,
    warm_pool,
)
from cave.errors import (
    CapacityError,
    InvalidArgumentError,
    LimitExceededError,
    SandboxNotFoundError,
    SandboxStateError,
)
from config.settings import Settings, load_settings, parse_overrides
from tests.support import poll_until

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def settings(cave_state_dir: Path) -> Settings:
    return load_settings(
        env={**os.environ, "CAVE_STATE_DIR": str(cave_state_dir), "CAVE_POOL_SIZE": "2"}
    )


def _poll(predicate, deadline_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.05)


def test_lifecycle_through_the_actor(settings: Settings) -> None:
    sandbox = create_sandbox(settings, parse_overrides(memory_mb=256))
    try:
        info = sandbox.info()
        assert info.state == "running"
        assert info.node_id == ray.get_runtime_context().get_node_id()
        assert info.limits is not None and info.limits.memory_mb == 256
        output = sandbox.run(["python3", "-c", "print(1)"])
        assert output.stdout == b"1\n" and output.result.exit_code == 0
        ray.get(sandbox.actor.write_file.remote("notes/a.txt", b"hello"))
        assert sandbox.run("cat notes/a.txt").stdout == b"hello"
        assert get_sandbox(sandbox.id).id == sandbox.id
    finally:
        stopped = stop_sandbox(sandbox.id)
    assert stopped.state == "stopped"
    with pytest.raises(SandboxStateError):
        sandbox.run("true")
    with pytest.raises(SandboxNotFoundError):
        get_sandbox(sandbox.id)


def test_exec_streams_chunks_before_the_command_ends(settings: Settings) -> None:
    sandbox = create_sandbox(settings)
    try:
        arrivals: list[tuple[float, OutputChunk | ExecResult]] = []
        script = "for i in 1 2 3; do echo $i; sleep 0.3; done; echo err >&2; exit 3"
        for item in sandbox.exec_stream(script):
            arrivals.append((time.monotonic(), item))
        chunks = [item for _, item in arrivals if isinstance(item, OutputChunk)]
        result = arrivals[-1][1]
        assert isinstance(result, ExecResult) and result.exit_code == 3
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"1\n2\n3\n"
        assert [c.data for c in chunks if c.stream == "stderr"] == [b"err\n"]
        first, last = arrivals[0][0], arrivals[-1][0]
        assert last - first > 0.5  # the first line came while the command was still running
    finally:
        stop_sandbox(sandbox.id)


def test_exec_arguments(settings: Settings) -> None:
    sandbox = create_sandbox(settings)
    try:
        out = sandbox.run(
            ["sh", "-c", 'echo "$GREETING"; pwd; cat'],
            env={"GREETING": "hi"},
            cwd="/tmp",
            stdin=b"from stdin",
        )
        assert out.stdout == b"hi\n/tmp\nfrom stdin"
        with pytest.raises(InvalidArgumentError):
            sandbox.run([])
        with pytest.raises(InvalidArgumentError):
            sandbox.run("true", timeout_s=0)
        with pytest.raises(InvalidArgumentError):
            sandbox.run("true", timeout_s=settings.defaults.timeout_s + 1)
    finally:
        stop_sandbox(sandbox.id)


def test_a_sandbox_is_what_the_kernel_ends_first_when_the_node_runs_out(
    settings: Settings,
) -> None:
    # Nodes take more sandboxes than their memory holds at once (memory_overcommit): a global
    # OOM must pick a sandbox's process, never a Ray worker or the API, and a sandbox cannot
    # make itself less likely.
    sandbox = create_sandbox(settings)
    try:
        script = "cat /proc/self/oom_score_adj; echo -500 > /proc/self/oom_score_adj || echo no"
        out = sandbox.run(["sh", "-c", script + "; cat /proc/self/oom_score_adj"])
        assert out.stdout.split() == [b"1000", b"no", b"1000"]
    finally:
        stop_sandbox(sandbox.id)


def test_bad_limits_fail_before_any_actor(settings: Settings) -> None:
    with pytest.raises(InvalidArgumentError, match="memory_mb"):
        parse_overrides(memory_mb=-5)
    with pytest.raises(LimitExceededError, match="pids"):
        create_sandbox(settings, parse_overrides(pids=settings.maximum.pids + 1))


def test_unknown_node_is_a_capacity_error() -> None:
    with pytest.raises(CapacityError):
        choose_node("ff" * 28)


def test_warm_pool_refills(settings: Settings) -> None:
    pool = warm_pool(ray.get_runtime_context().get_node_id(), settings)

    def floor_ready() -> bool:  # the pool's own floor: an earlier test may have made the pool
        stats = ray.get(pool.stats.remote())
        return bool(stats["ready"] >= stats["size"] > 0)

    _poll(floor_ready)
    sandbox = create_sandbox(settings)
    stop_sandbox(sandbox.id)
    _poll(floor_ready)


def _marked_pids(marker: str) -> list[str]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0] == b"python3" and marker.encode() in argv:
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_killed_actor_leaves_nothing_behind(settings: Settings) -> None:
    sandbox = create_sandbox(settings)
    slot = sandbox.info().slot
    marker = f"cave-marker-{sandbox.id}"
    sleeper = f"python3 -c 'import time; time.sleep(1000)' {marker}"
    running = sandbox.actor.exec.remote(f"({sleeper} &); {sleeper}")
    _poll(lambda: len(_marked_pids(marker)) == 2)
    ray.kill(sandbox.actor.actor)  # no stop(): the actor dies as on a crash
    _poll(lambda: not _marked_pids(marker), 30)
    del running
    # Its cgroup and directory go at the pool's next sweep, which follows every claim.
    cgroup_root = settings.isolation.cgroup_root
    leftovers = [
        *Path("/sys/fs/cgroup").glob(f"*/{cgroup_root}/{slot}"),
        settings.isolation.state_dir / "sandboxes" / slot,
    ]
    assert any(path.exists() for path in leftovers)
    stop_sandbox(create_sandbox(settings).id)
    _poll(lambda: not any(path.exists() for path in leftovers), 30)


def _stdout_until(
    items: Iterator[OutputChunk | ExecResult], wanted: bytes, seen: bytearray
) -> None:
    """Read the exec's items until its stdout holds `wanted` (its timeout_s bounds the wait)."""
    while wanted not in seen:
        item = next(items)
        assert isinstance(item, OutputChunk), f"the exec ended before {wanted!r}: {item}"
        seen.extend(item.data if item.stream == "stdout" else b"")


def _result(items: Iterator[OutputChunk | ExecResult], seen: bytearray) -> ExecResult:
    for item in items:
        if isinstance(item, ExecResult):
            return item
        assert isinstance(item, OutputChunk)
        seen.extend(item.data if item.stream == "stdout" else b"")
    raise AssertionError("the exec stream ended without a result")


def test_interactive_exec_reads_stdin_while_it_runs(settings: Settings) -> None:
    sandbox = create_sandbox(settings)
    try:
        exec_id, items = sandbox.exec_interactive(["cat"], timeout_s=30)
        out = bytearray()
        sandbox.write_stdin(exec_id, b"a\n")
        _stdout_until(items, b"a", out)  # echoed while cat still runs
        sandbox.write_stdin(exec_id, b"b\n")
        sandbox.close_stdin(exec_id)
        result = _result(items, out)
        assert (bytes(out), result.exit_code) == (b"a\nb\n", 0)
        with pytest.raises(SandboxStateError):
            sandbox.write_stdin(exec_id, b"late\n")
        # Not interactive: no exec id first, bytes stdin as before.
        plain = list(sandbox.exec_stream(["cat"], stdin=b"whole"))
        assert [type(item) for item in plain] == [OutputChunk, ExecResult]
        assert sandbox.run(["cat"], stdin=b"whole").stdout == b"whole"
        # The raw stream, as an async caller (the API) reads it: the id first, initial stdin used.
        refs = sandbox.actor.exec.remote(["head", "-c2"], stdin=b"hi", interactive=True)
        raw: list[Any] = [ray.get(ref) for ref in refs]
        assert isinstance(raw[0], ExecStarted) and isinstance(raw[-1], ExecResult)
        assert raw[1:-1] == [OutputChunk("stdout", b"hi")]
    finally:
        stop_sandbox(sandbox.id)


def test_interactive_exec_refuses_writes_once_done(settings: Settings) -> None:
    sandbox = create_sandbox(settings)
    try:
        exec_id, items = sandbox.exec_interactive(["head", "-n1"])
        sandbox.write_stdin(exec_id, b"one\n")
        out = bytearray()
        result = _result(items, out)  # head exits after one line, stdin still open
        assert (bytes(out), result.exit_code) == (b"one\n", 0)
        with pytest.raises(SandboxStateError):
            sandbox.write_stdin(exec_id, b"two\n")
        with pytest.raises(SandboxStateError):
            sandbox.close_stdin(exec_id)
        with pytest.raises(SandboxStateError):
            sandbox.write_stdin("no-such-exec", b"x")
    finally:
        stop_sandbox(sandbox.id)


def test_interactive_stdin_past_the_cap_is_refused(settings: Settings) -> None:
    sandbox = create_sandbox(settings)
    try:
        gated = "while [ ! -e /workspace/go ]; do sleep 0.05; done; wc -c"
        exec_id, items = sandbox.exec_interactive(gated, timeout_s=60)
        chunk, accepted = b"z" * (256 << 10), 0
        with pytest.raises(LimitExceededError):
            for _ in range(16):  # 4 MiB: far beyond the 1 MiB cap plus a pipe buffer
                sandbox.write_stdin(exec_id, chunk)
                accepted += len(chunk)
        ray.get(sandbox.actor.write_file.remote("go", b""))  # now the command reads
        sandbox.close_stdin(exec_id)
        out = bytearray()
        result = _result(items, out)
        assert result.exit_code == 0
        assert int(out) == accepted  # every accepted byte arrived, nothing of the refused one
    finally:
        stop_sandbox(sandbox.id)


def test_a_restarted_directory_knows_the_running_sandboxes_again(settings: Settings) -> None:
    from actors.sandboxes import directory

    sandbox = create_sandbox(settings)
    try:
        places = directory()
        ray.kill(places, no_restart=False)  # a crash: Ray restarts it with empty memory
        poll_until(  # ray.kill returns before the kill lands
            lambda: _restarts(places) >= 1, timeout_s=30, what="the directory restarted"
        )
        found = poll_until(
            lambda: _lookup(sandbox.id), timeout_s=30, what="the directory back with the sandbox"
        )
        assert found.node_id == sandbox.node_id
        assert found.run("echo still here").stdout == b"still here\n"
    finally:
        stop_sandbox(sandbox.id)


def _restarts(actor: Any) -> int:
    entry = ray._private.state.actors(actor._actor_id.hex())
    return int(entry["NumRestarts"]) if entry["State"] == "ALIVE" else 0


def _lookup(sandbox_id: str) -> SandboxHandle | None:
    try:
        return get_sandbox(sandbox_id)
    except (SandboxNotFoundError, RayActorError, ActorUnavailableError):
        return None  # not restored yet, or still restarting
