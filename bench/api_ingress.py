"""API ingress benchmark: Serve's proxy, Serve behind HAProxy and bare uvicorn, side by side.

`python -m bench.api_ingress [--target module:TARGET] [--setups ...]` starts a local cluster per
kind of setup with `cave up`'s code (Serve's default mode; RAY_SERVE_ENABLE_HA_PROXY=1; each
optionally tuned), serves the target on each (bare uvicorn in a driver of the default cluster),
checks every setup with the target's probe, runs every scenario against all of them in
interleaved rounds, and prints p50/p99, throughput and server CPU per request, with ratios to
bare uvicorn. The default target is a trivial app, defined at the end of this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import StreamingResponse
from ray import serve

from bench import http_load
from bench.http_load import Scenario, request_op
from cluster.ingress import TUNED_ENV, haproxy_env, listen_ports

REPO = Path(__file__).resolve().parent.parent
BASELINE = "uvicorn"
# Setup -> the cluster it runs on; "uvicorn" is the bare app in a driver, the others are Serve.
CLUSTER_OF = {
    "uvicorn": "default",
    "serve-proxy": "default",
    "serve-proxy-tuned": "tuned",
    "serve-haproxy": "haproxy",
    "serve-haproxy-tuned": "haproxy-tuned",
}
DEFAULT_SETUPS = ("uvicorn", "serve-proxy", "serve-haproxy", "serve-haproxy-tuned")
# Per-request costs that can be switched off: user code on the replica's own event loop rather
# than a thread of its own, access-log lines written in batches and not copied to stderr (three
# of RAY_SERVE_THROUGHPUT_OPTIMIZED=1's switches, without its direct ingress and gRPC), one
# HAProxy thread, and no HAProxy log line per request for Serve's metrics (the API counts its own).
READY_TIMEOUT_S = 180.0
POLL_S = 0.2


@dataclasses.dataclass(frozen=True)
class Target:
    """An app to serve, named by import paths ("module:attr") so child processes can build it.

    prepare(workdir) -> context (JSON-able): once per cluster, in a driver of it, first.
    serve_app(context) -> serve.Application and asgi_app(context) -> ASGI app: built in drivers
    of the cluster. scenarios(context) -> list[Scenario] and the optional async
    probe(base_url, context), which raises if a setup answers wrongly: called here.
    """

    serve_app: str
    asgi_app: str
    scenarios: str
    prepare: str | None = None
    probe: str | None = None
    ready_path: str = "/ping"


def load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class Bench(contextlib.ExitStack):
    """The clusters and servers of one run; leaving it stops every one of them."""

    def __init__(self, target_path: str, root: Path) -> None:
        super().__init__()
        self.target_path, self.target, self.root = target_path, load(target_path), root
        self.clusters: dict[str, Any] = {}
        self.contexts: dict[str, dict[str, Any]] = {}
        self.cluster_env: dict[str, dict[str, str]] = {}
        self.own_pids: dict[str, set[int]] = {}  # per setup, its processes outside the cluster
        self.trees: dict[str, Path] = {}  # per cluster, the source tree its processes run
        self.callback(shutil.rmtree, root, ignore_errors=True)

    def start_cluster(self, name: str, tree: Path = REPO) -> None:
        """`tree`: the checkout whose code the cluster's processes and drivers run (another
        commit's, to compare two versions side by side)."""
        from cluster.local import start_local_cluster, stop_local_cluster

        # Each setup's ingress is set here, exactly: "serve" keeps start_local_cluster from
        # adding its own default (HAProxy, tuned) on top.
        self.trees[name] = tree
        env = {"PYTHONPATH": _pythonpath(tree), "CAVE_INGRESS": "serve"}
        if name.startswith("haproxy"):
            ports = listen_ports(4)
            files = Path(f"/tmp/cave-haproxy-{ports[0]}")
            self.callback(shutil.rmtree, files, ignore_errors=True)
            env |= haproxy_env(ports, files)
        if name.endswith("tuned"):
            env |= TUNED_ENV
        self.cluster_env[name] = env
        state = self.root / name
        self.callback(stop_local_cluster, state)
        with _patched_environ(env):  # start_local_cluster hands os.environ to `ray start`
            self.clusters[name] = start_local_cluster(state, num_cpus=8)
        workdir = state / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        context: dict[str, Any] = {"workdir": str(workdir)}
        if self.target.prepare:
            out = self._driver(name, "_prepare", str(workdir))
            context = json.loads(out.strip().splitlines()[-1])
        self.contexts[name] = context
        (state / "context.json").write_text(json.dumps(context))

    def serve(self, setup: str, port: int, cluster: str | None = None) -> str:
        cluster = cluster or CLUSTER_OF[setup]
        if setup == "uvicorn":
            with self._log(cluster, "_uvicorn") as log:
                argv = self._argv(cluster, "_uvicorn", str(port))
                proc = subprocess.Popen(argv, stdout=log, stderr=log, **self._popen(cluster))
            self.callback(_stop_process, proc)
            self.own_pids[setup] = {proc.pid}
        else:
            self._driver(cluster, "_deploy", str(port))
        return f"http://127.0.0.1:{port}"

    def cpu_meter(self, setup: str, cluster: str | None = None) -> http_load.CpuMeter:
        """The CPU used by the setup's cluster (its `ray start` session) and own processes."""
        sessions = {self.clusters[cluster or CLUSTER_OF[setup]].pid}
        pids = self.own_pids.get(setup, set())
        return lambda: http_load.process_cpu_s(sessions, pids)

    def _driver(self, cluster: str, command: str, *args: str) -> str:
        """Run a driver to completion; its stdout is the answer, its stderr goes to a log."""
        with self._log(cluster, command) as log:
            argv = self._argv(cluster, command, *args)
            done = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=log, text=True, **self._popen(cluster)
            )
        if done.returncode != 0:
            tail = (self.root / cluster / f"{command}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{command} on cluster {cluster} failed:\n{tail}")
        return done.stdout

    @contextlib.contextmanager
    def _log(self, cluster: str, command: str) -> Iterator[Any]:
        with open(self.root / cluster / f"{command}.log", "ab") as log:
            yield log

    def _argv(self, cluster: str, command: str, *args: str) -> list[str]:
        head = [sys.executable, "-m", "bench.api_ingress", command, self.target_path]
        return [*head, self.clusters[cluster].address, str(self.root / cluster), *args]

    def _popen(self, cluster: str) -> dict[str, Any]:
        from cluster.local import driver_env

        # The drivers see the cluster's settings too: Serve reads them in every process.
        env = {**os.environ, **self.cluster_env[cluster], **driver_env(self.clusters[cluster])}
        return {"cwd": self.trees[cluster], "env": env, "stdin": subprocess.DEVNULL}


def _pythonpath(tree: Path = REPO) -> str:
    return os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)


@contextlib.contextmanager
def _patched_environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _child_main(command: str, target_path: str, address: str, state: str, *args: str) -> None:
    """A driver of one cluster: prepares the target, deploys it on Serve, or serves it bare."""
    from actors.warm_pool import NAMESPACE

    target: Target = load(target_path)
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    if command == "_prepare":
        print(json.dumps(load(target.prepare)(args[0]) if target.prepare else {}))
        return
    context = json.loads((Path(state) / "context.json").read_text())
    port = int(args[0])
    if command == "_uvicorn":
        import uvicorn

        app = load(target.asgi_app)(context)
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(load(target.serve_app)(context), name="bench", route_prefix="/")
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        _wait_direct_routing(ray.get_runtime_context().get_node_id())


def _wait_direct_routing(node_id: str) -> None:
    """Until HAProxy sees a replica UP it sends requests to Serve's fallback proxy: wait."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH

    sock = Path(RAY_SERVE_HAPROXY_SOCKET_PATH).parent / node_id / "admin.sock"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _replica_up(sock):
        if time.monotonic() > deadline:
            raise TimeoutError(f"HAProxy at {sock} never marked a replica UP")
        time.sleep(POLL_S)


def _replica_up(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5.0)
            sock.connect(str(sock_path))
            sock.sendall(b"show stat\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
    except OSError:
        return False
    rows = [line.split(",") for line in data.decode(errors="replace").splitlines() if line]
    if not rows:
        return False
    status = rows[0].index("status")  # the header: "# pxname,svname,...,status,..."
    return any(r[1].startswith("SERVE_REPLICA") and r[status] == "UP" for r in rows[1:])


async def probe_all(
    target: Target, urls: dict[str, str], contexts: dict[str, Any]
) -> dict[str, str]:
    verdicts = {setup: "none" for setup in urls}
    if not target.probe:
        return verdicts
    probe = load(target.probe)
    for setup, url in urls.items():
        try:
            await probe(url, contexts[setup])
            verdicts[setup] = "passed"
        except Exception as exc:  # a failure marks this setup incorrect; the others still run
            verdicts[setup] = f"FAILED: {type(exc).__name__}: {exc}"
    return verdicts


def run(target_path: str, setups: list[str], rounds: int, scale: float, out: Path | None) -> None:
    state = Path(os.environ.get("CAVE_BENCH_STATE_DIR", "/run/cave-bench"))
    with Bench(target_path, state / f"ingress-{os.getpid()}") as bench:
        for cluster in dict.fromkeys(CLUSTER_OF[s] for s in setups):
            started = time.monotonic()
            bench.start_cluster(cluster)
            print(f"cluster {cluster}: started and prepared in {time.monotonic() - started:.1f} s")
        urls = {}
        for setup, port in zip(setups, listen_ports(len(setups)), strict=True):
            started = time.monotonic()
            urls[setup] = bench.serve(setup, port)
            asyncio.run(
                http_load.wait_ready(urls[setup] + bench.target.ready_path, READY_TIMEOUT_S)
            )
            print(f"{setup}: serving at {urls[setup]} after {time.monotonic() - started:.1f} s")
        contexts = {s: bench.contexts[CLUSTER_OF[s]] for s in setups}
        scenarios = {s: load(bench.target.scenarios)(contexts[s]) for s in setups}
        probes = asyncio.run(probe_all(bench.target, urls, contexts))
        meters = {s: bench.cpu_meter(s) for s in setups}
        results = asyncio.run(http_load.compare(urls, scenarios, rounds, scale, meters))
    for setup, verdict in probes.items():
        print(f"probe {setup}: {verdict}")
    http_load.report(results, BASELINE if BASELINE in setups else None)
    if out is not None:
        rows = [
            {"scenario": n, "setup": s, **r.stats(), "errors": len(r.errors)}
            for (n, s), r in results.items()
        ]
        out.write_text(json.dumps({"probes": probes, "results": rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        _child_main(*argv)
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--target", default="bench.api_ingress:TRIVIAL", help="module:Target")
    parser.add_argument(
        "--setups",
        default=",".join(DEFAULT_SETUPS),
        help=f"comma-separated: {', '.join(CLUSTER_OF)}",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies request counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    if not setups or set(setups) - set(CLUSTER_OF):
        parser.error(f"--setups: choose from {', '.join(CLUSTER_OF)}")
    run(args.target, setups, args.rounds, args.scale, args.json)


# --- the trivial target: the shape of the API's hot path (one awaited actor call), no CAVE ----


@ray.remote(num_cpus=0)
class BenchStore:
    """Stands in for the database: one small read per request."""

    def get(self, key: str) -> dict[str, str]:
        return {"id": key, "state": "running"}


def trivial_api(context: Mapping[str, Any]) -> FastAPI:
    api = FastAPI()
    store: list[Any] = []  # the actor's handle, looked up on first use (after ray.init)

    @api.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/read/{key}")
    async def read(key: str) -> dict[str, str]:
        if not store:
            options = {"name": "bench-store", "namespace": "bench", "get_if_exists": True}
            actor: Any = BenchStore  # ray.remote made it an ActorClass; its stubs can't say
            store.append(actor.options(lifetime="detached", **options).remote())
        return dict(await store[0].get.remote(key))

    @api.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @api.get("/stream")
    async def stream(n: int = 5, delay_s: float = 0.0) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            for i in range(n):
                yield json.dumps({"i": i}) + "\n"
                await asyncio.sleep(delay_s)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @api.websocket("/ws")
    async def ws(sock: WebSocket) -> None:
        await sock.accept()
        async for text in sock.iter_text():
            if text == "bye":
                await sock.close(code=1000)
                return
            await sock.send_text("echo:" + text)

    return api


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class TrivialIngress:
    def __init__(self, context: Mapping[str, Any]) -> None:
        self._context = context

    def __serve_build_asgi_app__(self) -> FastAPI:
        return trivial_api(self._context)


def trivial_serve_app(context: Mapping[str, Any]) -> Any:
    return TrivialIngress.bind(dict(context))  # type: ignore[attr-defined]


def trivial_scenarios(context: Mapping[str, Any]) -> list[Scenario]:
    def row(resp: http_load.Response) -> None:
        if resp.json().get("state") != "running":
            raise http_load.UnexpectedResponse(f"not a row: {resp.body[:100]!r}")

    def five_lines(resp: http_load.Response) -> None:
        if len(resp.ndjson()) != 5:
            raise http_load.UnexpectedResponse(f"not 5 lines: {resp.body[:100]!r}")

    read = request_op(lambda i: http_load.Request("GET", f"/read/k{i}"), row)
    body = {"pad": "x" * 4096}
    return [
        Scenario("GET /ping", request_op(lambda i: http_load.Request("GET", "/ping")), 1, 600),
        Scenario("GET /read/{key} (one actor call)", read, 1, 600),
        Scenario("GET /read/{key} (one actor call), 16 clients", read, 16, 3000),
        Scenario(
            "POST /echo, 4 KiB JSON",
            request_op(lambda i: http_load.Request.json("POST", "/echo", body)),
            1,
            400,
        ),
        Scenario(
            "GET /stream, 5 NDJSON lines",
            request_op(lambda i: http_load.Request("GET", "/stream?n=5"), five_lines),
            1,
            400,
        ),
    ]


async def trivial_probe(base_url: str, context: Mapping[str, Any]) -> None:
    """Streams arrive line by line, large bodies and app 404s pass, WebSockets work."""
    from websockets.asyncio.client import connect

    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
        start = time.monotonic()
        async with client.stream("GET", "/stream?n=3&delay_s=0.5") as resp:
            lines = resp.aiter_lines()
            await anext(lines)
            first_s = time.monotonic() - start
            rest = [line async for line in lines if line]
        if len(rest) != 2 or first_s > time.monotonic() - start - 0.5:
            raise AssertionError(f"stream held back: first line after {first_s:.2f} s")
        size = (await client.post("/echo", content=b"x" * 2**20)).json()["size"]
        if size != 2**20:
            raise AssertionError(f"1 MiB body arrived as {size} bytes")
        if (status := (await client.get("/no-such-route")).status_code) != 404:
            raise AssertionError(f"unknown route answered {status}")
    async with connect(base_url.replace("http", "ws", 1) + "/ws") as sock:
        await sock.send("hello")
        if (echo := await sock.recv()) != "echo:hello":
            raise AssertionError(f"websocket echoed {echo!r}")
        await sock.send("bye")
        with contextlib.suppress(Exception):
            await sock.recv()
        if sock.close_code != 1000:
            raise AssertionError(f"websocket closed with {sock.close_code}")


TRIVIAL = Target(
    serve_app="bench.api_ingress:trivial_serve_app",
    asgi_app="bench.api_ingress:trivial_api",
    scenarios="bench.api_ingress:trivial_scenarios",
    probe="bench.api_ingress:trivial_probe",
)

if __name__ == "__main__":
    main()
