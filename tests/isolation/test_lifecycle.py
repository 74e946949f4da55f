"""Sandbox lifecycle and the exec contract: bad arguments, I/O, streaming, concurrency, stop."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from actors.isolation.backend import Backend, select_backend
from actors.isolation.results import ExecResult, OutputChunk
from actors.isolation.sandbox import Sandbox
from cave.errors import (
    CaveError,
    InvalidArgumentError,
    IsolationUnavailableError,
    OverloadedError,
    SandboxStateError,
)
from config.settings import load_settings
from tests.isolation.conftest import (
    LIMITS,
    assert_still_works,
    async_test,
    cgroup_dirs,
    host_pids_with_cmdline,
    isolation_env,
    open_sandbox,
    poll_until,
    run,
    unique_sleep,
)


@async_test
async def test_exec_after_stop_is_refused(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        await assert_still_works(sandbox)
    assert sandbox.state == "stopped"
    with pytest.raises(SandboxStateError):
        await run(sandbox, ["echo", "late"])
    with pytest.raises(SandboxStateError):
        await sandbox.files.read("anything")


@async_test
async def test_stop_is_idempotent(backend: Backend) -> None:
    sandbox = Sandbox(backend)
    await sandbox.prepare(LIMITS)
    await sandbox.start(LIMITS)
    await sandbox.stop()
    await sandbox.stop()
    assert sandbox.state == "stopped"
    assert not sandbox.sandbox_dir.exists()


@async_test
async def test_a_set_up_past_its_deadline_is_overload_and_leaves_nothing(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node too busy to set a sandbox up in time (a burst of worker starts on few cores):
    # a 429 to retry, not a 500, and nothing of the half-made sandbox kept.
    import actors.isolation.sandbox as module

    monkeypatch.setattr(module, "START_TIMEOUT_S", 0.0)
    sandbox = Sandbox(backend)
    with pytest.raises(OverloadedError) as refused:
        await sandbox.prepare(LIMITS)
    assert refused.value.retry_after_s > 0 and "overloaded" in refused.value.message
    assert sandbox.state == "failed"
    assert not sandbox.sandbox_dir.exists()
    assert not [d for d in cgroup_dirs(sandbox.id) if os.path.isdir(d)]


@async_test
async def test_stop_before_start_is_final(backend: Backend) -> None:
    sandbox = Sandbox(backend)
    await sandbox.prepare(LIMITS)
    await sandbox.stop()
    assert sandbox.state == "stopped"
    with pytest.raises(SandboxStateError):
        await sandbox.start(LIMITS)


@pytest.mark.parametrize("argv", [[], [""]], ids=["empty", "empty-program"])
@async_test
async def test_empty_argv_is_invalid(backend: Backend, argv: list[str]) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidArgumentError):
            await run(sandbox, argv)
        await assert_still_works(sandbox)


# Each of these can never run (execve takes C strings; env names cannot hold "="): the caller
# must hear so, and the sandbox, with any other exec running in it, must live on.
MALFORMED_EXECS = {
    "nul-in-arg": (["echo", "a\0b"], None),
    "nul-in-program": (["echo\0x"], None),
    "non-string-arg": (["echo", 1], None),
    "nul-in-env-value": (["true"], {"A": "x\0y"}),
    "equals-in-env-name": (["true"], {"A=B": "c"}),
    "non-string-env-value": (["true"], {"A": 1}),
    "env-not-a-mapping": (["true"], [("A", "b")]),
}


@pytest.mark.parametrize(("argv", "env"), MALFORMED_EXECS.values(), ids=MALFORMED_EXECS.keys())
@async_test
async def test_malformed_exec_is_refused_without_killing_the_sandbox(
    backend: Backend, argv: list[Any], env: dict[str, Any] | None
) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidArgumentError):
            await run(sandbox, argv, env=env)
        await assert_still_works(sandbox)


@pytest.mark.parametrize("timeout_s", [LIMITS.timeout_s + 1, 0, -1, float("nan"), "5", True])
@async_test
async def test_timeout_outside_the_limit_is_invalid(backend: Backend, timeout_s: Any) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidArgumentError):
            await run(sandbox, ["echo", "x"], timeout_s=timeout_s)
        await assert_still_works(sandbox)


@async_test
async def test_stdin_must_be_bytes(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidArgumentError, match="stdin must be bytes"):
            await run(sandbox, ["cat"], stdin="text")
        await assert_still_works(sandbox)


@async_test
async def test_argv_larger_than_a_control_message_does_not_break_the_sandbox(
    backend: Backend,
) -> None:
    # 1.5 MB of arguments: within the kernel's execve limit (a quarter of the 8 MiB stack), above
    # the 1 MiB control-socket message. Running it or refusing it are both fine; losing the
    # sandbox (and every other exec in it) is not.
    args = ["x" * 100_000] * 15
    async with open_sandbox(backend) as sandbox:
        try:
            out, _, result = await run(sandbox, ["printf", "%.1s", *args])
        except InvalidArgumentError:
            pass
        else:
            assert (out, result.exit_code) == (b"x" * len(args), 0)
        await assert_still_works(sandbox)


@async_test
async def test_stop_during_an_exec_ends_it_and_its_processes(backend: Backend) -> None:
    duration = unique_sleep()
    async with open_sandbox(backend) as sandbox:
        running = asyncio.ensure_future(run(sandbox, ["sleep", duration]))
        await poll_until(
            lambda: host_pids_with_cmdline(["sleep", duration]) != [], "the sleep never started"
        )
        await sandbox.stop()
        with pytest.raises(CaveError):
            await running
    assert host_pids_with_cmdline(["sleep", duration]) == []


@async_test
async def test_missing_cwd_is_a_clear_error(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        with pytest.raises(InvalidArgumentError, match="/no/such/dir"):
            await run(sandbox, ["pwd"], cwd="/no/such/dir")
        out, _, _ = await run(sandbox, ["pwd"], cwd="/tmp")
        assert out == b"/tmp\n"
        out, _, _ = await run(sandbox, ["pwd"])
        assert out == b"/workspace\n"


@async_test
async def test_unknown_command_exits_127_with_a_message(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        out, err, result = await run(sandbox, ["no-such-command-xyz", "arg"])
    assert result.exit_code == 127
    assert out == b""
    assert b"no-such-command-xyz" in err


@async_test
async def test_exit_code_and_stderr_are_reported(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        out, err, result = await run(sandbox, "echo to-out; echo to-err >&2; exit 3")
    assert (out, err, result.exit_code) == (b"to-out\n", b"to-err\n", 3)
    assert (result.stdout_bytes, result.stderr_bytes) == (7, 7)
    assert not (result.timed_out or result.oom_killed or result.truncated)


@async_test
async def test_stdin_is_delivered(backend: Backend) -> None:
    payload = b"line one\n" + bytes(range(256)) * 1024  # larger than a pipe buffer
    async with open_sandbox(backend) as sandbox:
        out, _, result = await run(sandbox, ["cat"], stdin=payload)
        empty, _, _ = await run(sandbox, ["cat"])
    assert (out, result.exit_code) == (payload, 0)
    assert empty == b""  # no stdin given: cat sees end of file, does not hang


@async_test
async def test_env_vars_are_passed(backend: Backend) -> None:
    async with open_sandbox(backend) as sandbox:
        out, _, _ = await run(sandbox, 'echo "$GREETING|$HOME"', env={"GREETING": "hi there"})
        host_only, _, _ = await run(sandbox, 'echo "[$CAVE_STATE_DIR][$VIRTUAL_ENV]"')
    assert out == b"hi there|/root\n"
    assert host_only == b"[][]\n"  # nothing of the host's environment leaks in


@async_test
async def test_output_streams_as_it_is_written(backend: Backend) -> None:
    # Each line carries the sandbox's wall clock when it was written (the host shares that clock).
    script = "for i in 1 2 3; do echo $i $(date +%s.%N); sleep 0.3; done"
    arrivals: list[tuple[float, bytes]] = []
    async with open_sandbox(backend) as sandbox:
        async for item in sandbox.exec(["sh", "-c", script]):
            if not isinstance(item, ExecResult):
                arrivals.append((time.time(), item.data))
    lines = b"".join(data for _, data in arrivals).decode().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert len(arrivals) >= 2, "all the output came in one chunk"
    first_arrived = arrivals[0][0]
    last_written = float(lines[-1].split()[1])
    assert first_arrived < last_written, "the first line was held back until the last one"


@async_test
async def test_first_chunk_arrives_while_the_command_still_runs(backend: Backend) -> None:
    # The command cannot finish before we answer its first line, so seeing that line first
    # proves streaming without any clock.
    script = "echo waiting; while [ ! -e /workspace/go ]; do sleep 0.05; done; echo done"
    async with open_sandbox(backend) as sandbox:
        stream = sandbox.exec(["sh", "-c", script], timeout_s=20)
        first = await anext(stream)
        assert first == OutputChunk("stdout", b"waiting\n")
        await sandbox.files.write("go", b"")
        rest = [item async for item in stream]
    assert isinstance(rest[-1], ExecResult) and rest[-1].exit_code == 0
    assert b"".join(c.data for c in rest if isinstance(c, OutputChunk)) == b"done\n"


@async_test
async def test_concurrent_execs_in_one_sandbox(backend: Backend) -> None:
    # Each running exec holds four pids (cave-exec, its namespace init, sh, sleep): 20 at once
    # need more than the 64 of LIMITS.
    async with open_sandbox(backend, LIMITS.model_copy(update={"pids": 128})) as sandbox:
        results = await asyncio.gather(
            *(run(sandbox, f"echo start {i}; sleep 0.2; echo end {i}") for i in range(20))
        )
    for i, (out, err, result) in enumerate(results):
        assert (out, err, result.exit_code) == (f"start {i}\nend {i}\n".encode(), b"", 0)


@async_test
async def test_degraded_backend_still_runs_commands(backend: Backend) -> None:
    degraded = select_backend(
        load_settings(env=isolation_env(CAVE_ISOLATION_BACKEND="none")).isolation
    )
    assert (degraded.name, degraded.isolated) == ("none", False)
    async with open_sandbox(degraded) as sandbox:
        out, err, result = await run(sandbox, ["echo", "ok"])
        assert (out, result.exit_code) == (b"ok\n", 0), err
        pause = unique_sleep()  # degraded kills by process group: a timeout still ends it all
        _, _, result = await run(sandbox, f"sleep {pause} & sleep {pause}", timeout_s=1)
        assert result.timed_out and result.exit_code == 124
        await poll_until(lambda: not host_pids_with_cmdline(["sleep", pause]), "sleeps gone")


def test_degraded_backend_refused_when_fallback_is_forbidden(backend: Backend) -> None:
    settings = load_settings(
        env=isolation_env(CAVE_ISOLATION_BACKEND="none", CAVE_ISOLATION_NO_FALLBACK="true")
    )
    with pytest.raises(IsolationUnavailableError, match="NO_FALLBACK"):
        select_backend(settings.isolation)


@async_test
async def test_a_prepared_sandbox_takes_the_limits_given_at_start(backend: Backend) -> None:
    """The warm-pool path: built with provisional limits, claimed with others."""
    sandbox = Sandbox(backend)
    await sandbox.prepare(LIMITS.model_copy(update={"disk_mb": 64, "pids": 64}))
    try:
        await sandbox.start(LIMITS.model_copy(update={"disk_mb": 8, "pids": 32}))
        _, err, result = await run(sandbox, "dd if=/dev/zero of=/workspace/fill bs=1M count=16")
        assert result.exit_code != 0 and b"No space left on device" in err
        size = (await sandbox.files.list(""))[0].size
        assert size <= 8 << 20
        out, _, _ = await run(sandbox, "cat /sys/fs/cgroup/pids.max 2>/dev/null || echo none")
        assert sandbox.limits is not None and sandbox.limits.pids == 32
    finally:
        await sandbox.stop()


_CRASHING_HOST = """
import asyncio, json, sys
from actors.isolation.backend import select_backend
from actors.isolation.sandbox import Sandbox
from config.settings import SandboxLimits, load_settings

async def main():
    env, limits, script = json.loads(sys.argv[1])
    sandbox = Sandbox(select_backend(load_settings(env=env).isolation))
    await sandbox.start(SandboxLimits(**limits))
    async for _ in sandbox.exec(["sh", "-c", script]):
        pass

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["none", "builtin"])
def test_a_host_process_killed_mid_exec_leaves_no_process(backend: Backend, mode: str) -> None:
    """The host side dies without stop(): its zygote sees the socket close and ends the execs."""
    import json
    import signal
    import subprocess
    import sys

    pause = unique_sleep()
    env = isolation_env(CAVE_ISOLATION_BACKEND=mode)
    host = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CRASHING_HOST,
            json.dumps([env, LIMITS.model_dump(), f"sleep {pause} & sleep {pause}"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(
            poll_until(
                lambda: len(host_pids_with_cmdline(["sleep", pause])) == 2,
                "the exec started",
                timeout_s=60,
            )
        )
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    asyncio.run(
        poll_until(
            lambda: not host_pids_with_cmdline(["sleep", pause]),
            "no process of the exec is left",
            timeout_s=30,
        )
    )
