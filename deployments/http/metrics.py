"""Prometheus metrics of the API: one registry per app, a pure-ASGI timing middleware, /metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.sandboxes.views import ExecOutcome

log = logging.getLogger(__name__)

EXEC_OUTCOMES: tuple[ExecOutcome, ...] = get_args(ExecOutcome)
SandboxCounts = Mapping[str, int | float]
SandboxCounter = Callable[[], Awaitable[SandboxCounts] | SandboxCounts]
# (node id, pool, sandboxes placed, capacity) of each sandbox node
NodeLoad = list[tuple[str, str, int, int]]
NodeCounter = Callable[[], Awaitable[NodeLoad]]

# The Prometheus text format 0.0.4: what generate_latest writes and every scraper reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "unmatched"
HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
EXEC_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# Any other method becomes "OTHER": a client must not mint label values (cardinality).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})


def route_template(scope: Scope, root_path_before: str = "") -> str:
    """The matched route's template (`/api/v1/sandboxes/{sandbox_id}`), never the raw path.

    Read after the app ran: routing writes into the scope. A mount adds its prefix to
    `root_path`, so the part added since `root_path_before` is the mount prefix of the route.
    """
    root_path: str = scope.get("root_path", "")
    prefix = root_path[len(root_path_before) :] if root_path.startswith(root_path_before) else ""
    path = _matched_path(scope)
    if path is not None:
        return prefix + path
    # A mounted ASGI app has no routes of its own to name: the mount stands for it all.
    return f"{prefix}/{{path}}" if prefix else UNMATCHED


def _matched_path(scope: Scope) -> str | None:
    route = scope.get("route")
    if route is not None and not isinstance(route, Mount):
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else None
    endpoint = scope.get("endpoint")
    if route is not None or endpoint is None:
        return None
    # FastAPI sets scope["route"] for its own routes only; a plain Starlette `Route` (/metrics,
    # /mcp) leaves just its endpoint, so find the route of the router that holds that endpoint.
    for candidate in getattr(scope.get("router"), "routes", ()):
        if getattr(candidate, "endpoint", None) is endpoint:
            path = getattr(candidate, "path", None)
            return path if isinstance(path, str) else None
    return None


class ApiMetrics:
    """The metrics of one API app, in a registry of its own (several apps may share a process)."""

    def __init__(self, *, sandbox_count_timeout_s: float = 5.0) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self._add_http_metrics()
        self._add_sandbox_metrics()
        # labels() validates and locks on each call; the hot path looks children up here instead.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._sandbox_counter: SandboxCounter | None = None
        self._node_counter: NodeCounter | None = None
        self._sandbox_count_timeout_s = sandbox_count_timeout_s
        self._states_seen: set[str] = set()
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def _add_http_metrics(self) -> None:
        self._requests = Counter(
            "cave_http_requests",
            "HTTP requests and WebSocket sessions served.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._request_duration = Histogram(
            "cave_http_request_duration_seconds",
            "Time from request to the last byte of the response (WebSocket: the whole session).",
            ["method", "route"],
            buckets=HTTP_BUCKETS_S,
            registry=self.registry,
        )
        self._errors = Counter(
            "cave_errors", "Error responses by JSON error code.", ["code"], registry=self.registry
        )

    def _add_sandbox_metrics(self) -> None:
        self._execs = Counter(
            "cave_execs",
            "Commands run in sandboxes, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in EXEC_OUTCOMES:
            self._execs.labels(outcome)  # every outcome is a series from the start, at 0
        self._exec_duration = Histogram(
            "cave_exec_duration_seconds",
            "Wall-clock time of commands run in sandboxes.",
            buckets=EXEC_BUCKETS_S,
            registry=self.registry,
        )
        self._sandboxes = Gauge(
            "cave_sandboxes",
            "Sandboxes by state, counted at scrape time.",
            ["state"],
            registry=self.registry,
        )
        self._node_sandboxes = Gauge(
            "cave_node_sandboxes",
            "Sandboxes placed on each sandbox node (those being started included), at scrape time.",
            ["node_id", "pool"],
            registry=self.registry,
        )
        self._node_capacity = Gauge(
            "cave_node_sandbox_capacity",
            "The most sandboxes each sandbox node takes (its cave_sandbox resource).",
            ["node_id", "pool"],
            registry=self.registry,
        )
        self._count_failures = Counter(
            "cave_sandbox_count_failures",
            "Scrapes whose sandbox count failed or timed out.",
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, duration_s: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self._requests.labels(method, route, str(status)),
                self._request_duration.labels(method, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(duration_s)

    def count_error(self, code: str) -> None:
        """Count one error response by its JSON `error.code`; call from the exception handlers."""
        self._errors.labels(code).inc()

    def observe_exec(self, outcome: ExecOutcome, duration_s: float) -> None:
        if outcome not in EXEC_OUTCOMES:
            raise ValueError(f"unknown exec outcome {outcome!r}; expected one of {EXEC_OUTCOMES}")
        self._execs.labels(outcome).inc()
        self._exec_duration.observe(duration_s)

    def set_sandbox_counter(self, counter: SandboxCounter) -> None:
        """Count sandboxes by state at each scrape with `counter` (sync or async).

        A sync counter runs on the event loop, so it must be quick (an in-memory table).
        """
        self._sandbox_counter = counter

    def set_revocation_age(self, age_s: Callable[[], float]) -> None:
        """Report the age of the replica's revocation view (`RevocationCache.age_s`) at scrape
        time: past CAVE_LLM_REVOCATION_MAX_AGE_S the replica refuses model-access keys."""
        Gauge(
            "cave_llm_revocation_view_age_seconds",
            "Seconds since this replica last read the revoked model-access keys (+Inf: never).",
            registry=self.registry,
        ).set_function(age_s)

    def set_node_counter(self, counter: NodeCounter) -> None:
        """Report each sandbox node's load and capacity at each scrape with `counter`."""
        self._node_counter = counter

    def add_refresher(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Run `refresh` (it sets gauges of its own in `registry`) before each scrape; it must
        not raise (deployments/http/isolation_metrics.py is one)."""
        self._refreshers.append(refresh)

    async def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, sandbox counts refreshed first."""
        await self._refresh_sandboxes()
        await self._refresh_nodes()
        for refresh in self._refreshers:
            await refresh()
        # No await between the refresh and here: a concurrent scrape cannot interleave.
        return generate_latest(self.registry), CONTENT_TYPE

    async def _refresh_sandboxes(self) -> None:
        if self._sandbox_counter is None:
            return
        try:
            counts = await self._count_sandboxes(self._sandbox_counter)
        except Exception:
            # A failing database must not hide the other metrics; a stale count would mislead.
            log.warning("counting sandboxes for /metrics failed", exc_info=True)
            self._count_failures.inc()
            self._sandboxes.clear()
            self._states_seen.clear()
            return
        # A state seen before and absent now reads 0, not a gap in the series.
        for state in self._states_seen - counts.keys():
            self._sandboxes.labels(state).set(0)
        for state, count in counts.items():
            self._sandboxes.labels(state).set(count)
        self._states_seen |= counts.keys()

    async def _refresh_nodes(self) -> None:
        if self._node_counter is None:
            return
        # Nodes come and go: the series are rebuilt from the current table at each scrape.
        self._node_sandboxes.clear()
        self._node_capacity.clear()
        try:
            nodes = await asyncio.wait_for(self._node_counter(), self._sandbox_count_timeout_s)
        except Exception:  # the directory is restarting: no node series this time
            log.warning("reading the sandbox nodes for /metrics failed", exc_info=True)
            self._count_failures.inc()
            return
        for node_id, pool, used, capacity in nodes:
            self._node_sandboxes.labels(node_id, pool).set(used)
            self._node_capacity.labels(node_id, pool).set(capacity)

    async def _count_sandboxes(self, counter: SandboxCounter) -> dict[str, int | float]:
        result = counter()
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, self._sandbox_count_timeout_s)
        return dict(result)


class MetricsMiddleware:
    """Times each HTTP request and WebSocket session; pure ASGI so streaming is untouched."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        elif scope["type"] == "websocket":
            method = "WS"
        else:
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            status = status_of(message, status)
            await send(message)

        root_path = scope.get("root_path", "")
        started = perf_counter()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # Status 0: the app raised or returned before answering; the server sends a 500.
            self.metrics.observe_request(
                method, route_template(scope, root_path), status or 500, perf_counter() - started
            )


def status_of(message: Message, status: int) -> int:
    """The response status once `message` is sent, given the one before (0: none yet)."""
    kind = message["type"]
    if kind == "http.response.start" or kind == "websocket.http.response.start":
        return int(message["status"])
    if kind == "websocket.accept":
        return 101
    if kind == "websocket.close" and status == 0:
        return 403  # closed before the handshake completed: servers answer 403
    return status


def install_metrics(app: Starlette, metrics: ApiMetrics) -> None:
    """Add the timing middleware and `GET /metrics` (Prometheus text format) to `app`."""

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = await metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
