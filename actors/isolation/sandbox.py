"""Host side of one sandbox: start from a warm standby, run commands, move files, tear down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path

from actors.isolation import janitor, protocol
from actors.isolation.aio import wait_readable
from actors.isolation.backend import Backend
from actors.isolation.cgroups import CgroupLimits, SandboxCgroup
from actors.isolation.channel import Channel
from actors.isolation.exec_stream import ExecRequest, run_exec
from actors.isolation.file_ops import FileOps
from actors.isolation.forkserver import ForkServer, Launched
from actors.isolation.results import ExecResult, OutputChunk
from actors.isolation.rootfs import RootfsSpec
from actors.isolation.stdin_feed import StdinFeed
from cave.errors import (
    InvalidArgumentError,
    OverloadedError,
    SandboxError,
    SandboxStateError,
)
from config.settings import SandboxLimits

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
SHM_BYTES_MAX = 64 << 20
START_TIMEOUT_S = 30.0


class Sandbox:
    """One sandbox on this host. States: standby -> running -> stopped (or failed).

    `prepare` builds it completely (namespaces, root, cgroup) with provisional limits, so that a
    warm pool can hold ready sandboxes; `start` only applies the caller's limits to one of them.
    `id` names its host resources (cgroup, directory); callers keep their own public ids.
    """

    def __init__(self, backend: Backend, sandbox_id: str | None = None) -> None:
        self.id = sandbox_id or uuid.uuid4().hex
        self.backend = backend
        self.state = "standby"
        self.limits: SandboxLimits | None = None
        self.failure: str | None = None
        self._prepared: SandboxLimits | None = None
        self._channel: Channel | None = None
        self._keeper: Channel | None = None
        self._events: asyncio.Queue[protocol.Message] = asyncio.Queue()
        self._cgroup: SandboxCgroup | None = None
        self._zygote_pid: int | None = None
        self._launcher: Launched | None = None
        self.files = FileOps(self._require_channel)

    @property
    def sandbox_dir(self) -> Path:
        return self.backend.state_dir / "sandboxes" / self.id

    async def prepare(self, limits: SandboxLimits) -> None:
        """Build the whole sandbox with these limits; `start` may change them afterwards."""
        if self._launcher is not None:
            raise SandboxStateError(f"sandbox {self.id} is already prepared")
        try:
            await self._spawn_launcher()
            await self._setup(limits)
        except BaseException as exc:
            self.failure = str(exc)
            await self.stop()
            self.state = "failed"
            raise
        self._prepared = limits

    async def start(self, limits: SandboxLimits) -> None:
        if self.state != "standby":
            raise SandboxStateError(f"sandbox {self.id} is {self.state}, cannot start")
        if self._prepared is None:
            await self.prepare(limits)
        elif limits != self._prepared:
            await self._apply(limits)
        self.limits = limits
        self.state = "running"

    async def _spawn_launcher(self) -> None:
        host_sock, sandbox_sock = protocol.socket_pair()
        host_keeper, sandbox_keeper = protocol.socket_pair()
        fds = (sandbox_sock.fileno(), sandbox_keeper.fileno())
        try:
            self._launcher = _fork_server().spawn(fds)
        except OSError as exc:
            for sock in (host_sock, sandbox_sock, host_keeper, sandbox_keeper):
                sock.close()
            raise SandboxError(f"sandbox {self.id}: cannot start its launcher: {exc}") from exc
        sandbox_sock.close()
        sandbox_keeper.close()
        self._channel = Channel(host_sock, self._events.put_nowait)
        self._keeper = Channel(host_keeper, self._on_keeper_event)
        await self._expect("standby")

    def _on_keeper_event(self, event: protocol.Message) -> None:
        if event.get("op") == "spawned":  # the keeper's own end is no news: its zygote tells
            self._events.put_nowait(event)

    async def _setup(self, limits: SandboxLimits) -> None:
        janitor.claim(self.sandbox_dir)
        if self.backend.cgroups is not None:
            self._cgroup = self.backend.cgroups.create(self.id, _cgroup_limits(limits))
        assert self._channel is not None
        await self._channel.send(
            {
                "op": "setup",
                "isolated": self.backend.isolated,
                "backend": self.backend.name,
                "bwrap_path": self.backend.bwrap_path,
                "uid": self.backend.sandbox_uid,
                "cgroup_procs": self._cgroup.procs_files() if self._cgroup else [],
                "exec_helper": str(self.backend.exec_helper),
                "seccomp_bpf": self.backend.seccomp_bpf.hex() if self.backend.seccomp_bpf else None,
                "rootfs": self._rootfs_spec(limits).__dict__,
            }
        )
        spawned = await self._expect("spawned")
        self._zygote_pid = int(spawned["pid"])
        await self._expect("ready")
        if self.backend.name == "bwrap":  # its launcher is done once bwrap runs the zygote
            assert self._launcher is not None
            await asyncio.to_thread(self._launcher.wait, 5)

    def _rootfs_spec(self, limits: SandboxLimits) -> RootfsSpec:
        return RootfsSpec(
            base=str(self.backend.base),
            sandbox_dir=str(self.sandbox_dir),
            disk_bytes=limits.disk_bytes,
            shm_bytes=min(SHM_BYTES_MAX, limits.disk_bytes),
            uid=self.backend.sandbox_uid,
            hostname=f"cave-{self.id[:12]}",
            host_binds=self.backend.host_binds,
        )

    async def _apply(self, limits: SandboxLimits) -> None:
        """Give a prepared sandbox other limits: cgroup files, and the disk through its keeper."""
        assert self._prepared is not None
        if self._cgroup is not None:
            self._cgroup.set_limits(_cgroup_limits(limits))
        if limits.disk_mb == self._prepared.disk_mb or not self.backend.isolated:
            return
        if self.backend.name != "builtin":  # bwrap sizes its tmpfs at start: build anew
            await self.stop()
            self._reset()
            await self.prepare(limits)
            return
        assert self._keeper is not None
        reply, _ = await self._keeper.request({"op": "resize", "disk_bytes": limits.disk_bytes})
        if "error" in reply:
            raise SandboxError(f"sandbox {self.id}: cannot resize its disk: {reply['error']}")

    def _reset(self) -> None:
        self.state, self._prepared, self._cgroup, self._zygote_pid = "standby", None, None, None
        self._launcher, self._channel, self._keeper = None, None, None

    async def _expect(self, op: str) -> protocol.Message:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self._events.get(), max(remaining, 0.001))
            except TimeoutError:
                # A set-up that outwaits its deadline is a node too busy to start one more
                # (a burst of worker starts on few cores): overload, a 429 to retry, not a fault.
                raise OverloadedError(
                    f"sandbox {self.id}: its set-up took longer than {START_TIMEOUT_S:g} s "
                    f"(no {op!r}): the node is overloaded; nothing was kept, retry shortly",
                    quota="node_setup",
                    retry_after_s=5.0,
                ) from None
            if event.get("op") == op:
                return event
            if event.get("op") in ("failed", "closed"):
                raise SandboxError(
                    f"sandbox {self.id} failed to start: "
                    f"{event.get('error', 'the launcher exited')}"
                )

    def _require_channel(self) -> Channel:
        if self.state != "running" or self._channel is None or self._channel.closed:
            if self.state == "running":
                self.state, self.failure = "failed", "the sandbox init process exited"
            raise SandboxStateError(f"sandbox {self.id} is {self.state}")
        return self._channel

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | StdinFeed | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[OutputChunk | ExecResult]:
        """Run one command; yields output chunks as they come, then the ExecResult.

        `stdin` is written whole (bytes), or while the command runs through a StdinFeed.
        """
        channel = self._require_channel()
        assert self.limits is not None
        timeout = self.limits.timeout_s if timeout_s is None else timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidArgumentError(f"timeout_s must be a number of seconds, got {timeout!r}")
        if not 0 < timeout <= self.limits.timeout_s:  # NaN fails this too
            raise InvalidArgumentError(
                f"timeout_s must be in (0, {self.limits.timeout_s}], got {timeout}"
            )
        request = ExecRequest(argv, env or {}, cwd, stdin, timeout, self.limits.output_bytes)
        async for item in run_exec(channel, request, self._oom_count):
            yield item

    def _oom_count(self) -> int:
        return self._cgroup.oom_kill_count() if self._cgroup else 0

    async def stop(self) -> None:
        """Kill every process, release cgroup, mounts and directories. Idempotent."""
        if self.state == "stopped":
            return
        self.state = "stopped"
        for channel in (self._channel, self._keeper):
            if channel is not None:
                channel.close()
        await self._kill_zygote()
        if self._launcher is not None:
            if self._launcher.poll() is None and self._launcher.pid != self._zygote_pid:
                # The keeper ends once its zygote has: wait for that, kill only if it lingers.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(self._launcher.wait, 5)
            if self._launcher.poll() is None:
                self._launcher.kill()
            await asyncio.to_thread(self._launcher.wait)
            self._launcher.close()
        if self._cgroup is not None:
            await asyncio.to_thread(self._cgroup.destroy)
        shutil.rmtree(self.sandbox_dir, ignore_errors=True)

    async def _kill_zygote(self) -> None:
        pid = self._zygote_pid
        if pid is None or (self._launcher is not None and pid == self._launcher.pid):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            with contextlib.suppress(ProcessLookupError):  # it exited once its socket closed
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await wait_readable(pidfd)
            with contextlib.suppress(ChildProcessError):  # the keeper's child, or the host's
                os.waitpid(pid, os.WNOHANG)
        finally:
            os.close(pidfd)


@cache
def _fork_server() -> ForkServer:
    """This process's fork server, which starts every launcher (actors/isolation/forkserver.py);
    it gets a clean environment: nothing of the Ray worker's (tokens, addresses) reaches a
    sandbox's processes."""
    env = {"PYTHONPATH": _PACKAGE_ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return ForkServer(_PACKAGE_ROOT, env)


def _cgroup_limits(limits: SandboxLimits) -> CgroupLimits:
    return CgroupLimits(limits.memory_bytes, limits.pids, limits.cpu)
