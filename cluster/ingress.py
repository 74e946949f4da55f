"""How HTTP reaches the API: Serve's HAProxy ingress (the default) or its own proxy actor.

HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1) forwards straight to each ingress replica's own
uvicorn: about 1 ms per request on this hardware against about 5 ms through the proxy actor (see
docs/ingress.md). Serve reads these variables once, at import, in every Ray process, so they
belong in the environment of `ray start` (or of the driver calling `ray.init`), not in a
runtime_env.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Mapping
from pathlib import Path

from cave.settings_env import load_section
from config.api import ClusterSettings

# Per-request savings measured with the CAVE app (docs/ingress.md): user code on the replica's
# own event loop (our routes never block it), buffered request logs, one HAProxy thread.
TUNED_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def ingress_choice(env: Mapping[str, str]) -> str:
    """CAVE_INGRESS (config.api.ClusterSettings): `haproxy` or `serve`."""
    return load_section(ClusterSettings, env).ingress


def ingress_env(env: Mapping[str, str], files: Path) -> dict[str, str]:
    """What `ray start` needs for the chosen ingress; HAProxy keeps its files in `files`."""
    if ingress_choice(env) == "serve":
        return {}
    return haproxy_env(listen_ports(4), files) | TUNED_ENV


def haproxy_env(ports: list[int], files: Path) -> dict[str, str]:
    """Serve's HAProxy ingress on a host that may run other clusters: the four fixed default
    ports (8404, 9101, 8500, 9500) moved to free ones, and the files out of the shared
    /tmp/haproxy-serve into one directory of this cluster (short: it holds unix sockets, at
    files/<56-character node id>/admin.sock, and a socket path has at most 107 bytes)."""
    stats, metrics, fallback_http, fallback_grpc = ports
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        # A stopped ingress replica otherwise lingers 30 s, longer than `cave down` waits.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def listen_ports(count: int, low: int = 21000, high: int = 30000) -> list[int]:
    """Ports free on every interface, below the kernel's ephemeral range (32768-60999): a port
    found free by binding port 0 is in that range, and an outgoing connection can take it
    before HAProxy binds it. Ray's worker ports are 10002-19999, direct ingress 30000-31000."""
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:  # hold them all so that they are distinct
        for port in random.sample(range(low, high), high - low):
            sock = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                sock.bind(("0.0.0.0", port))
                chosen.append(port)
                if len(chosen) == count:
                    return chosen
    raise RuntimeError(f"fewer than {count} free ports in {low}-{high}")
