"""Launchers by fork: one pre-imported process per host starts every sandbox's launcher.

A launcher started as `python -m actors.isolation.launcher` pays an interpreter start and its
imports (about 80 ms of CPU) before it does anything; a burst of 100 creates paid that 100
times, and each keeper held its own copy of those modules. The fork server pays it once: the
host starts it at its first sandbox (`ForkServer.spawn`), it imports the launcher, and every
launcher after is a fork of it (a few ms; its pages shared until written).

Protocol, over a private SEQPACKET pair: the host sends `{"op": "spawn"}` with the launcher's
two socket ends; the server forks, and the child runs `launcher.run` on them; the server answers
with the child's pidfd, through which the host waits for and kills the launcher (it is not the
host's child). The server reaps its children. It ends when the host's end closes (the host
exited or crashed): the launchers it started go on, and end with their own sockets.

    python -m actors.isolation.forkserver CTRL_FD
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import NoReturn

from actors.isolation import protocol

ANSWER_TIMEOUT_S = 5.0  # a fork takes milliseconds


class Launched:
    """A launcher started by the fork server, seen through its pidfd: what the host needs of a
    `subprocess.Popen` (poll, wait, kill, pid), for a process that is not its child."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid, self._pidfd = pid, pidfd

    def poll(self) -> int | None:
        """0 once it has exited, None while it runs (its exit status is the server's)."""
        if self._pidfd < 0:
            return 0
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return 0 if ready else None

    def wait(self, timeout: float | None = None) -> int:
        if self._pidfd >= 0:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"launcher {self.pid}", timeout or 0)
        return 0

    def kill(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class ForkServer:
    """The host's side: starts the server at the first spawn, again if it has died."""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        self._cwd, self._env = cwd, env
        self._sock: socket.socket | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request at a time: each waits for its own answer

    def spawn(self, fds: tuple[int, int]) -> Launched:
        """Fork a launcher with these two socket ends (the host keeps its own copies)."""
        with self._lock:
            for attempt in range(2):
                sock = self._running()
                try:
                    protocol.send(sock, {"op": "spawn"}, list(fds))
                    reply, pidfds = protocol.recv(sock)
                except OSError:  # TimeoutError among them
                    reply, pidfds = None, []
                if reply is not None and len(pidfds) == 1:
                    return Launched(int(reply["pid"]), pidfds[0])
                for fd in pidfds:
                    os.close(fd)
                self._stop()  # died or confused: a fresh one for the retry
                if attempt:
                    detail = reply.get("error") if reply else "it exited"
                    raise OSError(f"the sandbox fork server failed: {detail}")
        raise AssertionError("unreachable")

    def _running(self) -> socket.socket:
        if self._sock is not None and self._server is not None and self._server.poll() is None:
            return self._sock
        self._stop()
        host, server = protocol.socket_pair()
        self._server = subprocess.Popen(
            [sys.executable, "-m", "actors.isolation.forkserver", str(server.fileno())],
            pass_fds=(server.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=self._cwd,
            env=self._env,
        )
        server.close()
        # Its host waits for each answer on its event loop, which runs every other sandbox of
        # the host too: a server that hangs (stopped, stuck) is replaced, not waited for.
        host.settimeout(ANSWER_TIMEOUT_S)
        self._sock = host
        return host

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the server ends at this EOF
            self._sock = None
        if self._server is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(0.5)
            if self._server.poll() is None:
                self._server.kill()
                self._server.wait()
            self._server = None


# --- the server process ---


def _reap(_signum: int, _frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def serve(ctrl: socket.socket) -> NoReturn:
    from actors.isolation import launcher  # imported once here, inherited by every fork

    signal.signal(signal.SIGCHLD, _reap)
    while True:
        message, fds = protocol.recv(ctrl)
        if message is None:  # the host is gone
            os._exit(0)
        if message.get("op") != "spawn" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            protocol.send(ctrl, {"error": f"bad request {message!r}"})
            continue
        # SIGCHLD held until the child's pidfd is open: reaped before, its pid could be reused,
        # and the pidfd would name another process. A pidfd names this child for good.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:  # the launcher: nothing of the server's but the two ends it was given
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            ctrl.close()
            launcher.run(fds[0], fds[1])
        try:
            pidfd = os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)
        try:
            protocol.send(ctrl, {"pid": pid}, [pidfd])
        finally:
            os.close(pidfd)


def main() -> NoReturn:
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    ctrl.set_inheritable(False)
    serve(ctrl)


if __name__ == "__main__":
    main()
