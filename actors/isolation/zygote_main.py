"""Entry point of a zygote that bwrap starts by exec: its state comes as fd numbers in argv.

Run inside the sandbox by `python3 -I -S -B -c BOOTSTRAP ...` (see bwrap.py) with only the stdlib
and `actors.isolation` on its path, so nothing here may import pydantic, ray or `cave`.

    serve SOCK_FD BPF_FD STARTED_FD LOG_FD HELPER   be the sandbox's zygote
    probe HELPER                                    run `true` through cave-exec, exit with its code
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NoReturn

from actors.isolation.sandbox_files import WORKSPACE
from actors.isolation.zygote import ENV_FD, Zygote, environment_memfd


def main(argv: list[str]) -> NoReturn:
    if argv[:1] == ["probe"] and len(argv) == 2:
        _probe(argv[1])
    if argv[:1] == ["serve"] and len(argv) == 6:
        sock_fd, bpf_fd, started_fd, log_fd = (int(a) for a in argv[1:5])
        _serve(sock_fd, bpf_fd, started_fd, log_fd, argv[5])
    sys.stderr.write(f"usage: see {__file__}; got {argv!r}\n")
    os._exit(2)


def _serve(sock_fd: int, bpf_fd: int, started_fd: int, log_fd: int, helper: str) -> NoReturn:
    os.dup2(log_fd, 2)  # away from the launcher's pipe, which nobody reads once it has exited
    os.close(log_fd)
    sock = socket.socket(fileno=sock_fd)
    sock.set_inheritable(False)
    if bpf_fd >= 0:
        os.set_inheritable(bpf_fd, False)
    os.write(started_fd, b"r")
    os.close(started_fd)
    Zygote(sock, helper, bpf_fd, isolated=True, workspace=WORKSPACE).serve()


def _probe(helper: str) -> NoReturn:
    env_fd = environment_memfd({"PATH": "/usr/bin:/bin"})
    argv = ["cave-exec", "1", "-1", str(ENV_FD), "/", "--", "true"]
    actions = [(os.POSIX_SPAWN_DUP2, env_fd, ENV_FD)]
    pid = os.posix_spawn(helper, argv, {}, file_actions=actions)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(code if code >= 0 else 128 - code)
