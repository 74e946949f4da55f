"""The zygote, pid 1 of a sandbox: spawns each command (through cave-exec), serves file ops."""

from __future__ import annotations

# The zygote runs after pivot_root, where the host interpreter's library is out of reach: every
# module (and codec) it may need later is imported now.
import encodings.ascii  # noqa: F401
import encodings.latin_1  # noqa: F401
import errno
import fcntl
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from actors.isolation import protocol, sandbox_files

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
BPF_FD = 3  # where cave-exec finds the seccomp program
ENV_FD = 4  # where cave-exec finds the command's environment


@dataclass
class _Running:
    exec_id: int
    pid: int
    pidfd: int
    deadline: float
    timed_out: bool = False


@dataclass
class Zygote:
    sock: socket.socket
    helper_path: str  # cave-exec, as /proc/self/fd/N when the host path is out of reach
    bpf_fd: int  # memfd holding the seccomp program, -1 for none
    isolated: bool = True  # False in degraded mode: no pid namespace per exec
    workspace: str = "/workspace"
    running: dict[int, _Running] = field(default_factory=dict)

    def serve(self) -> NoReturn:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        self.files = sandbox_files.Workspace.open(self.workspace)
        while True:
            for key, _ in sel.select(self._next_timeout()):
                if key.data is None:
                    self._on_request(sel)
                else:
                    self._reap(sel)
            self._enforce_deadlines()

    def _next_timeout(self) -> float | None:
        if not self.running:
            return None
        return max(0.0, min(r.deadline for r in self.running.values()) - time.monotonic())

    def _on_request(self, sel: selectors.BaseSelector) -> None:
        try:
            message, fds = protocol.recv(self.sock)
        except ValueError:  # truncated or not JSON: the host checks sizes, so drop it and go on
            return
        if message is None:  # the host side is gone: end the sandbox with it
            for run in self.running.values():
                # In a pid namespace our exit kills everything anyway; degraded, only this does.
                _kill(run.pid, self.isolated)
            os._exit(0)
        op = message.get("op")
        if op == "exec":
            self._start_exec(message, fds, sel)
        else:
            self._reply_file_op(message, fds)

    def _reply_file_op(self, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        try:
            reply, out_fds = self.files.handle(message)
        except OSError as exc:
            reply, out_fds = {"error": exc.strerror or str(exc), "errno": exc.errno}, []
        except sandbox_files.PathEscape as exc:
            reply, out_fds = {"error": str(exc), "kind": "invalid_path"}, []
        except (ValueError, TypeError) as exc:  # a malformed request must not end the sandbox
            reply, out_fds = {"error": str(exc), "kind": "invalid_argument"}, []
        reply["id"] = message.get("id")
        protocol.send(self.sock, reply, out_fds)
        for fd in out_fds:
            os.close(fd)

    def _start_exec(self, req: dict[str, Any], fds: list[int], sel: selectors.BaseSelector) -> None:
        exec_id = req["id"]
        try:
            pid = self._fork_command(req, fds)
        except OSError as exc:
            protocol.send(
                self.sock, {"op": "exit", "id": exec_id, "error": exc.strerror, "errno": exc.errno}
            )
            return
        except (ValueError, TypeError, KeyError) as exc:  # malformed: refuse, keep serving
            protocol.send(
                self.sock,
                {"op": "exit", "id": exec_id, "error": str(exc), "kind": "invalid_argument"},
            )
            return
        finally:
            for fd in fds:
                os.close(fd)
        pidfd = os.pidfd_open(pid)
        deadline = time.monotonic() + float(req["timeout_s"])
        self.running[pid] = _Running(exec_id, pid, pidfd, deadline)
        sel.register(pidfd, selectors.EVENT_READ, pid)

    def _fork_command(self, req: dict[str, Any], fds: list[int]) -> int:
        cwd = req.get("cwd") or self.workspace
        if not os.path.isdir(cwd):
            raise OSError(errno.ENOENT, f"working directory {cwd!r} does not exist")
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds[:3])]
        if self.bpf_fd >= 0:
            actions.append((os.POSIX_SPAWN_DUP2, self.bpf_fd, BPF_FD))
        argv = [
            "cave-exec",
            "1" if self.isolated else "0",
            str(BPF_FD if self.bpf_fd >= 0 else -1),
            str(ENV_FD),
            cwd,
            "--",
            *req["argv"],
        ]
        env_fd = environment_memfd({**DEFAULT_ENV, **req.get("env", {})})
        actions.append((os.POSIX_SPAWN_DUP2, env_fd, ENV_FD))
        # posix_spawn (vfork underneath): no copy of this Python process per command. cave-exec
        # starts with no environment at all: it holds capabilities until the command's exec.
        try:
            if self.isolated:
                return os.posix_spawn(self.helper_path, argv, {}, file_actions=actions)
            return os.posix_spawn(self.helper_path, argv, {}, file_actions=actions, setpgroup=0)
        finally:
            os.close(env_fd)

    def _reap(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.running.pop(pid, None)
            if run is None:
                continue
            sel.unregister(run.pidfd)
            os.close(run.pidfd)
            code = 124 if run.timed_out else _exit_code(status)
            protocol.send(
                self.sock,
                {"op": "exit", "id": run.exec_id, "exit_code": code, "timed_out": run.timed_out},
            )

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for run in self.running.values():
            if not run.timed_out and now >= run.deadline:
                run.timed_out = True
                # Killing the pid-namespace init takes every process of the exec with it,
                # double-forked daemons included.
                _kill(run.pid, self.isolated)


def environment_memfd(env: dict[str, str]) -> int:
    """The environment as cave-exec reads it: NUL-terminated KEY=VALUE strings in a memfd."""
    entries = []
    for key, value in env.items():
        name, data = os.fsencode(key), os.fsencode(value)
        if not name or b"=" in name or b"\0" in name or b"\0" in data:
            raise ValueError(f"illegal environment variable {key!r}")
        entries.append(name + b"=" + data + b"\0")
    # Above the numbers posix_spawn's dup2 actions write (0-4), so that no action overwrites it.
    memfd = os.memfd_create("cave-env", os.MFD_CLOEXEC)
    fd = fcntl.fcntl(memfd, fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(memfd)
    try:
        block = b"".join(entries)
        while block:
            block = block[os.write(fd, block) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kill(pid: int, isolated: bool) -> None:
    try:
        if isolated:
            os.kill(pid, signal.SIGKILL)
        else:  # degraded: the exec's process group is all we can reach
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)
