"""HTTP load generation: a lean keep-alive HTTP/1.1 client, scenarios, and comparisons of
several servers measured in interleaved rounds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

from bench.common import percentiles

READ_CHUNK = 65536


class UnexpectedResponse(Exception):
    """A response a correct server would not send; it counts as an error, not as a sample."""


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    expect_status: int = 200

    @classmethod
    def json(cls, method: str, path: str, payload: Any, **kwargs: Any) -> Request:
        headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
        return cls(method, path, headers, json.dumps(payload).encode(), **kwargs)

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"host: {host}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.body or self.method not in ("GET", "HEAD", "DELETE"):
            lines.append(f"content-length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


class _Message:
    """httptools callbacks for one response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class HttpConnection:
    """One keep-alive HTTP/1.1 connection. Costs a fraction of httpx's client-side CPU, which
    matters when the client shares two cores with the servers it measures."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 80
        self._host_header = url.netloc
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, req: Request) -> Response:
        reused = self._writer is not None
        try:
            return await self._exchange(req)
        except ConnectionResetError:
            if not reused:
                raise
        # The server dropped an idle keep-alive connection before reading the request: resend.
        await self.close()
        return await self._exchange(req)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):  # already reset by the peer: nothing to release
                await writer.wait_closed()

    async def _exchange(self, req: Request) -> Response:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._reader, self._writer
        writer.write(req.encode(self._host_header))
        message = _Message()
        parser = httptools.HttpResponseParser(message)
        received = False
        while not message.complete:
            data = await reader.read(READ_CHUNK)
            if not data:
                await self.close()
                if received:
                    raise UnexpectedResponse("connection closed mid-response")
                # Nothing at all came back: the request was never read (see request()).
                raise ConnectionResetError("closed before any response")
            received = True
            parser.feed_data(data)
        if not parser.should_keep_alive():
            await self.close()
        return Response(parser.get_status_code(), message.headers, bytes(message.body))


# An operation: given a connection and its sequence number, do untimed set-up if it needs any,
# then return the seconds the measured part took. Raise UnexpectedResponse for a wrong answer.
Op = Callable[[HttpConnection, int], Awaitable[float]]
Check = Callable[[Response], None]


async def send(conn: HttpConnection, req: Request, check: Check | None = None) -> Response:
    """Send a request and insist on its expected status (and check, if given)."""
    resp = await conn.request(req)
    if resp.status != req.expect_status:
        raise UnexpectedResponse(
            f"{req.method} {req.path}: {resp.status}, expected {req.expect_status}: "
            f"{resp.body[:200]!r}"
        )
    if check is not None:
        check(resp)
    return resp


def request_op(make: Callable[[int], Request], check: Check | None = None) -> Op:
    """An operation that times one request built by `make(i)`."""

    async def op(conn: HttpConnection, i: int) -> float:
        req = make(i)
        start = time.perf_counter()
        await send(conn, req, check)
        return time.perf_counter() - start

    return op


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    op: Op
    clients: int = 1  # 1: a sequential keep-alive client
    requests: int = 300  # measured operations, all clients together
    warmup: int = 20  # per client, not measured


@dataclasses.dataclass(frozen=True)
class LoadResult:
    samples_s: list[float]
    errors: list[str]
    wall_s: float
    cpu_s: float = math.nan  # CPU the server's processes used meanwhile, when it was metered

    def stats(self) -> dict[str, float]:
        stats = percentiles(self.samples_s) if self.samples_s else {}
        stats["rps"] = len(self.samples_s) / self.wall_s if self.wall_s else 0.0
        stats["cpu_ms_per_req"] = self.cpu_s * 1000 / max(1, len(self.samples_s))
        return stats

    @staticmethod
    def merge(results: list[LoadResult]) -> LoadResult:
        samples = [s for r in results for s in r.samples_s]
        errors = [e for r in results for e in r.errors]
        wall_s, cpu_s = sum(r.wall_s for r in results), sum(r.cpu_s for r in results)
        return LoadResult(samples, errors, wall_s, cpu_s)


CpuMeter = Callable[[], float]  # cumulative CPU seconds of the processes that serve


def process_cpu_s(sessions: set[int], pids: set[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes of these sessions, and by
    these processes. On a shared machine this is steadier than throughput: other load slows a
    server down but hardly changes the CPU that a request costs it."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[3]) in sessions or int(entry.name) in pids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def run_scenario(
    base_url: str, scenario: Scenario, requests: int | None = None, cpu: CpuMeter | None = None
) -> LoadResult:
    """Warm each client's connection up, then run the measured operations across the clients."""
    conns = [HttpConnection(base_url) for _ in range(scenario.clients)]
    total = scenario.requests if requests is None else requests
    try:
        await asyncio.gather(*(_warm(conn, scenario) for conn in conns))
        samples: list[float] = []
        errors: list[str] = []
        counter = iter(range(total))
        cpu_start, start = cpu() if cpu else math.nan, time.perf_counter()
        await asyncio.gather(
            *(_drive(conn, scenario.op, counter, samples, errors) for conn in conns)
        )
        wall_s = time.perf_counter() - start
        return LoadResult(samples, errors, wall_s, cpu() - cpu_start if cpu else math.nan)
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def _warm(conn: HttpConnection, scenario: Scenario) -> None:
    for i in range(scenario.warmup):
        await scenario.op(conn, -1 - i)


async def _drive(
    conn: HttpConnection, op: Op, counter: Any, samples: list[float], errors: list[str]
) -> None:
    for i in counter:  # one shared iterator: the clients draw operations until it runs dry
        try:
            samples.append(await op(conn, i))
        except (UnexpectedResponse, OSError, httptools.HttpParserError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            await conn.close()


async def wait_ready(url: str, timeout_s: float, poll_s: float = 0.2) -> None:
    """Poll `url` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready within {timeout_s:g} s")
            await asyncio.sleep(poll_s)


async def compare(
    urls: Mapping[str, str],
    scenarios: Mapping[str, list[Scenario]],
    rounds: int,
    scale: float = 1.0,
    cpu: Mapping[str, CpuMeter] | None = None,
) -> dict[tuple[str, str], LoadResult]:
    """Every scenario on every server, keyed (scenario, server), in rounds whose server order
    rotates, so that drift in the machine's speed spreads over all servers alike."""
    parts: dict[tuple[str, str], list[LoadResult]] = {}
    servers = list(urls)
    for r in range(rounds):
        order = servers[r % len(servers) :] + servers[: r % len(servers)]
        for name in [s.name for s in scenarios[servers[0]]]:
            for server in order:
                scenario = next(s for s in scenarios[server] if s.name == name)
                requests = max(1, math.ceil(scenario.requests * scale / rounds))
                meter = (cpu or {}).get(server)
                result = await run_scenario(urls[server], scenario, requests, meter)
                parts.setdefault((name, server), []).append(result)
    return {key: LoadResult.merge(results) for key, results in parts.items()}


def report(results: Mapping[tuple[str, str], LoadResult], baseline: str | None) -> None:
    """One table per scenario: p50, p99, throughput and CPU per request, each also as a ratio
    to `baseline`'s."""
    width = max(len(key[1]) for key in results)
    for name in dict.fromkeys(key[0] for key in results):
        rows = {server: r for (n, server), r in results.items() if n == name}
        base = rows[baseline].stats() if baseline in rows and rows[baseline].samples_s else None
        print(f"\n{name} (ratios: to {baseline})" if base else f"\n{name}")
        print(
            f"  {'':{width}s}  {'p50 ms':>14s}  {'p99 ms':>8s}  {'req/s':>12s}  {'CPU ms/req':>14s}"
        )
        for server, result in rows.items():
            print(f"  {server:{width}s}  {_row(result, base)}")


def _row(result: LoadResult, base: dict[str, float] | None) -> str:
    stats = result.stats()
    if not result.samples_s:
        return f"no samples; {len(result.errors)} errors, first: {result.errors[:1]}"

    def cell(key: str, fmt: str) -> str:
        known = base is not None and math.isfinite(stats[key] / base.get(key, math.nan))
        ratio = f" x{stats[key] / base[key]:.2f}" if base and known else ""
        return f"{stats[key]:{fmt}}{ratio:>6s}"

    line = f"{cell('p50_ms', '8.2f')}  {stats['p99_ms']:8.2f}  {cell('rps', '6.0f')}  "
    line += cell("cpu_ms_per_req", "8.2f")
    if result.errors:
        line += f"  ERRORS {len(result.errors)}, first: {result.errors[0]}"
    return line
