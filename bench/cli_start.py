"""`cave` start-up: `cave --help` and `cave sandbox ls` next to `python -c pass` and to importing
the HTTP client alone, each a fresh process, in interleaved rounds (CAVE_BENCH_N, default 20).

`cave sandbox ls` talks to a stub HTTP server in this process that answers the list route with
an empty page: what is measured is the CLI's start and one round trip, not the API's work.

CAVE_BENCH_VENV=/path/to/venv measures that venv's `python` and `cave` instead of this one's:
e.g. a fresh venv with only the server's and client's wheels (`make dist`), as a user installs
them, without the dev tools whose packages (rich, pydantic plugins) slow every import here.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import percentiles

N = int(os.environ.get("CAVE_BENCH_N", "20"))
TARGET_S = 0.4
BIN = Path(os.environ.get("CAVE_BENCH_VENV") or Path(sys.executable).parents[1]) / "bin"
PYTHON, CAVE = str(BIN / "python"), str(BIN / "cave")


class _EmptyList(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.dumps({"items": [], "next_cursor": None}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyList)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "CAVE_API_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "CAVE_API_KEY": "cave_live_bench_stub",
    }
    commands = {
        "python -c pass (floor)": [PYTHON, "-c", "pass"],
        "python -c 'import cave.client' (baseline)": [PYTHON, "-c", "import cave.client"],
        "cave --help": [CAVE, "--help"],
        "cave sandbox ls": [CAVE, "sandbox", "ls"],
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(N + 2):  # the first two rounds warm the page cache, not measured
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
            samples[name].append(time.perf_counter() - start)
    server.shutdown()
    print(f"venv: {BIN.parent}")
    base = percentiles(samples["python -c 'import cave.client' (baseline)"][2:])["p50_ms"]
    for name, values in samples.items():
        stats = percentiles(values[2:])
        verdict = ""
        if name.startswith("cave "):
            met = stats["p50_ms"] <= TARGET_S * 1000
            verdict = f"  (target <= {TARGET_S} s: {'met' if met else 'NOT met'})"
        print(
            f"{name:44s} p50 {stats['p50_ms']:7.1f} ms  p99 {stats['p99_ms']:7.1f} ms"
            f"  x{stats['p50_ms'] / base:.2f} of the client import{verdict}"
        )


if __name__ == "__main__":
    main()
