"""A local Ray cluster for `cave up` / `cave down`: started in its own session, stopped by it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from subprocess import DEVNULL, STDOUT
from typing import IO

import ray
from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

from actors.sandboxes import stop_all
from actors.warm_pool import NAMESPACE
from cave.errors import CaveError
from cluster.ingress import ingress_env

STATE_FILE = "cluster.json"
LOG_FILE = "ray.log"
TOKEN_FILE = "auth_token"
START_TIMEOUT_S = 90.0
PROBE_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 20.0
TERM_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 5.0
POLL_S = 0.1
RAY_START = [
    "start",
    "--head",
    "--block",
    "--node-ip-address=127.0.0.1",
    "--include-dashboard=false",
    "--disable-usage-stats",
]

# Run in a fresh interpreter: a driver that can connect and sees an alive node means "ready".
_PROBE = (
    "import sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
    "sys.exit(0 if any(n['Alive'] for n in ray.nodes()) else 1)\n"
)


class ClusterError(CaveError):
    """The local cluster cannot be started or reached (a candidate for cave/errors.py's tree)."""

    code = "cluster_error"


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    address: str  # GCS address, host:port
    pid: int  # the `ray start --block` process, leader of its own session
    pgid: int
    log: str
    token_path: str  # this cluster's own Ray auth token, so ~/.ray/auth_token cannot interfere

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def start_local_cluster(state_dir: Path, num_cpus: int | None = None) -> ClusterInfo:
    """Start a head node on free ports and wait until a driver can use it; idempotent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    running = running_cluster(state_dir)
    if running is not None:
        return running
    gcs, client, dashboard, agent = _free_ports(4)  # 6379, Ray's default, may be Redis's
    flags = f"--port={gcs} --ray-client-server-port={client} --dashboard-port={dashboard} "
    flags += f"--dashboard-agent-listen-port={agent} --num-cpus={num_cpus or os.cpu_count()}"
    log, token = state_dir / LOG_FILE, _write_token(state_dir / TOKEN_FILE)
    info = ClusterInfo(f"127.0.0.1:{gcs}", 0, 0, str(log), str(token))
    # No drain on SIGTERM: `cave down` has already emptied the cluster, so teardown is immediate.
    ingress = ingress_env(os.environ, ingress_files(info))
    env = {**_child_env(info), **ingress, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "ray.scripts.scripts", *RAY_START, *flags.split()]
        proc = subprocess.Popen(
            argv, stdout=out, stderr=STDOUT, stdin=DEVNULL, env=env, start_new_session=True
        )
    info = dataclasses.replace(info, pid=proc.pid, pgid=proc.pid)
    try:
        _wait_ready(info, proc)
    except BaseException:
        _terminate(info)
        raise
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def stop_local_cluster(state_dir: Path) -> bool:
    """Empty the cluster of sandboxes, end every process of it; False if nothing was running."""
    info = _read_state(state_dir)
    if info is None:
        return False
    if _is_ours(info):
        _drain(info)
    found = bool(cluster_processes(info))  # also the leftovers of a leader that died
    if found:
        _terminate(info)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    Path(info.token_path).unlink(missing_ok=True)
    shutil.rmtree(ingress_files(info), ignore_errors=True)
    return found


def cluster_address(state_dir: Path) -> str | None:
    """RAY_ADDRESS if set, else the address of the running cluster recorded in state_dir."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    running = running_cluster(state_dir)
    return None if running is None else running.address


def driver_env(info: ClusterInfo) -> dict[str, str]:
    """What a Ray driver needs to reach this cluster (RAY_AUTH_TOKEN, if set, would win)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": info.token_path}


def use_cluster_token(info: ClusterInfo) -> None:
    """Make this process's next ray.init authenticate to the cluster with its token."""
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(driver_env(info))
    # Ray latches the auth mode and token when it is imported; this is how Ray itself
    # (authentication_token_setup._enable_token_auth) makes a running process see a new mode.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def cluster_processes(info: ClusterInfo) -> list[int]:
    """Live processes of the cluster: its session (workers leave the group, not the session)
    and any that name its GCS port."""
    pattern = re.compile(rf"--(gcs-)?address=\S*:{info.port}(\s|$)|--gcs_server_port={info.port}\b")
    session = info.pid if _session_is_ours(info) else None
    found = []
    for pid in _pids():
        fields = _stat(pid)
        if fields is None or fields[0] in "ZX":
            continue
        if int(fields[3]) == session or pattern.search(_cmdline(pid)):
            found.append(pid)
    return found


def running_cluster(state_dir: Path) -> ClusterInfo | None:
    """The cluster recorded in state_dir if its `ray start` process is still alive."""
    info = _read_state(state_dir)
    return info if info is not None and _is_ours(info) else None


def _read_state(state_dir: Path) -> ClusterInfo | None:
    try:
        return ClusterInfo(**json.loads((state_dir / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_ours(info: ClusterInfo) -> bool:
    """The recorded leader is alive and still our `ray start` (the pid was not reused)."""
    fields = _stat(info.pid)
    alive = fields is not None and fields[0] not in "ZX"
    cmdline = _cmdline(info.pid)
    return alive and "start" in cmdline and f"--port={info.port}" in cmdline


def _session_is_ours(info: ClusterInfo) -> bool:
    # Linux never reuses a pid that still names a session, so unless another process now holds
    # the leader's pid, the processes of session `info.pid` are ours.
    fields = _stat(info.pid)
    return fields is None or fields[0] in "ZX" or _is_ours(info)


def _write_token(path: Path) -> Path:
    path.unlink(missing_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(secrets.token_hex(32))
    return path


def ingress_files(info: ClusterInfo) -> Path:
    """HAProxy's config and sockets: short (unix socket paths), one directory per cluster."""
    return Path(f"/tmp/cave-haproxy-{info.port}")


def _child_env(info: ClusterInfo) -> dict[str, str]:
    unset = ("RAY_ADDRESS", "RAY_AUTH_TOKEN")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **driver_env(info)}


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # hold them all open so the ports are distinct
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _wait_ready(info: ClusterInfo, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _port_open(info.port):
        _check_progress(info, proc, deadline)
        time.sleep(POLL_S)
    while not _probe(info, deadline):
        _check_progress(info, proc, deadline)
        time.sleep(POLL_S)


def _check_progress(info: ClusterInfo, proc: subprocess.Popen[bytes], deadline: float) -> None:
    if proc.poll() is not None:
        raise ClusterError(f"ray start exited with {proc.returncode}:\n{_tail(info.log)}")
    if time.monotonic() > deadline:
        raise ClusterError(
            f"no answer from {info.address} within {START_TIMEOUT_S:g} s:\n{_tail(info.log)}"
        )


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _probe(info: ClusterInfo, deadline: float) -> bool:
    timeout_s = max(1.0, min(PROBE_TIMEOUT_S, deadline - time.monotonic()))
    return _python(info, ["-c", _PROBE, info.address], timeout_s, DEVNULL) == 0


def _python(info: ClusterInfo, args: list[str], timeout_s: float, out: IO[bytes] | int) -> int:
    """Run this interpreter as a driver of the cluster; -1 when it ran out of time."""
    argv, env = [sys.executable, *args], _child_env(info)
    try:
        done = subprocess.run(
            argv, env=env, stdin=DEVNULL, stdout=out, stderr=out, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return -1
    return done.returncode


def _tail(log: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _drain(info: ClusterInfo) -> None:
    """Stop the sandboxes and empty the warm pools first, so no sandbox process outlives Ray."""
    with open(info.log, "ab") as out:
        _python(info, ["-m", "cluster.local", "drain", info.address], DRAIN_TIMEOUT_S, out)


def _terminate(info: ClusterInfo) -> None:
    """SIGTERM the leader (it stops its children in order) and its group, then SIGKILL the rest."""
    patience = TERM_TIMEOUT_S
    if _is_ours(info):
        _signal([info.pid], signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(info.pgid, signal.SIGTERM)
    else:  # the leader is gone; what it left (Ray's agents) ignores SIGTERM, so be brief
        _signal(cluster_processes(info), signal.SIGTERM)
        patience = KILL_TIMEOUT_S
    if _wait_gone(info, patience):
        return
    _signal(cluster_processes(info), signal.SIGKILL)
    _wait_gone(info, KILL_TIMEOUT_S)


def _wait_gone(info: ClusterInfo, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while cluster_processes(info):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _pids() -> Iterator[int]:
    return (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _drain_cluster(address: str) -> None:
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    from ray import serve

    try:
        serve.shutdown()  # no request may start a sandbox while they are being stopped
    except Exception as exc:
        print(f"cave down: stopping the API: {exc}", file=sys.stderr)
    for problem in stop_all(timeout_s=DRAIN_TIMEOUT_S / 2):
        # The cluster is about to be killed anyway; note it in the log.
        print(f"cave down: {problem}", file=sys.stderr)


if __name__ == "__main__" and sys.argv[1:2] == ["drain"]:
    _drain_cluster(sys.argv[2])
