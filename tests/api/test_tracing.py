"""OpenTelemetry tracing of the API, on a small FastAPI app with the real middleware."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from config.api import DEFAULT_SAMPLING_RATE
from deployments.http.tracing import (
    install_tracing,
    load_sampling_rate,
    select_exporter,
    setup_tracing,
)
from deployments.spans import current_trace_id, span

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
SANDBOX_ROUTE = "/api/v1/sandboxes/{sandbox_id}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class StateRequestId:
    """Stands in for the app's request-id middleware: it settles the id in scope["state"]."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/with-state-id"):
            scope.setdefault("state", {})["request_id"] = "req-from-state"
        await self.app(scope, receive, send)


def build_app(provider: TracerProvider) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/sandboxes/{sandbox_id}")
    async def get_sandbox(sandbox_id: str) -> dict[str, str | None]:
        with span("sandbox.get", sandbox_id=sandbox_id, name=None):
            return {"id": sandbox_id, "trace_id": current_trace_id()}

    @app.post("/api/v1/sandboxes/{sandbox_id}/exec")
    async def exec_in(sandbox_id: str) -> None:
        with span("sandbox.exec", sandbox_id=sandbox_id):
            raise RuntimeError("actor died")

    @app.get("/api/v1/sandboxes/{sandbox_id}/with-state-id")
    async def with_state_id(sandbox_id: str) -> dict[str, str]:
        return {}

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/api/v1/sandboxes/{sandbox_id}/exec/ws")
    async def exec_ws(websocket: WebSocket, sandbox_id: str) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app.add_middleware(StateRequestId)
    install_tracing(app, provider)
    return app


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def tracing_client(provider: TracerProvider) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(provider), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://cave")


def finished(provider: TracerProvider, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    provider.force_flush()  # the batch processor exports on its own thread
    return list(exporter.get_finished_spans())


@dataclass
class Traced:
    """A client of a traced app, and what the app's tracer provider exported."""

    client: httpx.AsyncClient
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return finished(self.provider, self.exporter)

    def server_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind is SpanKind.SERVER]


@pytest.fixture
async def traced(exporter: InMemorySpanExporter) -> AsyncIterator[Traced]:
    provider = setup_tracing("cave-test", 1.0, exporter)
    async with tracing_client(provider) as client:
        yield Traced(client, provider, exporter)
    provider.shutdown()


async def test_one_server_span_per_request_named_by_route_template(
    traced: Traced,
) -> None:
    for sandbox_id in ("sbx_1", "sbx_2"):
        response = await traced.client.get(
            f"/api/v1/sandboxes/{sandbox_id}", headers={"X-Request-Id": f"req-{sandbox_id}"}
        )
        assert response.status_code == 200

    spans = traced.server_spans()
    assert [s.name for s in spans] == [f"GET {SANDBOX_ROUTE}"] * 2
    first = spans[0]
    assert first.attributes is not None
    assert first.attributes["http.route"] == SANDBOX_ROUTE
    assert first.attributes["http.request.method"] == "GET"
    assert first.attributes["url.path"] == "/api/v1/sandboxes/sbx_1"
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["cave.request_id"] == "req-sbx_1"
    assert first.resource.attributes["service.name"] == "cave-test"


async def test_the_request_id_settled_in_scope_state_wins(traced: Traced) -> None:
    await traced.client.get(
        "/api/v1/sandboxes/sbx_1/with-state-id", headers={"X-Request-Id": "sent"}
    )

    (server,) = traced.server_spans()
    assert server.attributes is not None
    assert server.attributes["cave.request_id"] == "req-from-state"


async def test_an_incoming_traceparent_is_the_parent(traced: Traced) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"

    response = await traced.client.get(
        "/api/v1/sandboxes/sbx_1", headers={"traceparent": traceparent}
    )

    (server,) = traced.server_spans()
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == PARENT_SPAN_ID
    assert response.json()["trace_id"] == TRACE_ID


async def test_span_helper_makes_a_child_of_the_request_span(traced: Traced) -> None:
    await traced.client.get("/api/v1/sandboxes/sbx_1")

    spans = traced.spans()
    child = next(s for s in spans if s.name == "sandbox.get")
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert child.attributes == {"cave.sandbox_id": "sbx_1"}  # None values are left out


async def test_a_failure_marks_the_child_and_the_request_span_as_errors(
    traced: Traced,
) -> None:
    assert (await traced.client.post("/api/v1/sandboxes/sbx_1/exec")).status_code == 500

    spans = traced.spans()
    child = next(s for s in spans if s.name == "sandbox.exec")
    (server,) = traced.server_spans()
    assert child.status.status_code is StatusCode.ERROR
    assert [event.name for event in child.events] == ["exception"]
    assert server.name == "POST /api/v1/sandboxes/{sandbox_id}/exec"
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None and server.attributes["error.type"] == "RuntimeError"


async def test_a_client_error_is_not_a_server_error(traced: Traced) -> None:
    assert (await traced.client.get("/no/such/path")).status_code == 404

    (server,) = traced.server_spans()
    assert server.name == "GET"  # no route, so no template: the method alone (conventions)
    assert server.attributes is not None
    assert "http.route" not in server.attributes
    assert server.attributes["http.response.status_code"] == 404
    assert server.status.status_code is StatusCode.UNSET


async def test_probes_are_not_traced(traced: Traced) -> None:
    assert (await traced.client.get("/healthz")).status_code == 200

    assert traced.server_spans() == []


async def test_the_query_string_is_never_recorded(traced: Traced) -> None:
    await traced.client.get("/api/v1/sandboxes/sbx_1?access_token=cave_live_abc_secret")

    for recorded in traced.spans():
        assert "secret" not in repr(dict(recorded.attributes or {}))


def test_websocket_sessions_get_a_span(exporter: InMemorySpanExporter) -> None:
    provider = setup_tracing("cave-test", 1.0, exporter)
    with (
        TestClient(build_app(provider)) as client,
        client.websocket_connect("/api/v1/sandboxes/sbx_1/exec/ws") as websocket,
    ):
        assert websocket.receive_text() == "hi"

    (server,) = finished(provider, exporter)
    assert server.name == "WS /api/v1/sandboxes/{sandbox_id}/exec/ws"
    assert server.kind is SpanKind.SERVER


async def test_rate_zero_records_nothing(exporter: InMemorySpanExporter) -> None:
    provider = setup_tracing("cave-test", 0.0, exporter)
    async with tracing_client(provider) as client:
        for _ in range(20):
            assert (await client.get("/api/v1/sandboxes/sbx_1")).status_code == 200

    assert finished(provider, exporter) == []


async def test_rate_zero_still_follows_a_sampled_parent(exporter: InMemorySpanExporter) -> None:
    provider = setup_tracing("cave-test", 0.0, exporter)
    sampled, unsampled = (f"00-{TRACE_ID}-{PARENT_SPAN_ID}-{flags}" for flags in ("01", "00"))
    async with tracing_client(provider) as client:
        await client.get("/api/v1/sandboxes/sbx_1", headers={"traceparent": sampled})
        await client.get("/api/v1/sandboxes/sbx_2", headers={"traceparent": unsampled})

    recorded = finished(provider, exporter)
    assert {s.name for s in recorded} == {f"GET {SANDBOX_ROUTE}", "sandbox.get"}
    assert all(format(s.context.trace_id, "032x") == TRACE_ID for s in recorded)
    assert len(recorded) == 2  # the unsampled caller's request left nothing


async def test_without_an_exporter_nothing_is_recorded_but_the_trace_id_flows(
    exporter: InMemorySpanExporter,
) -> None:
    provider = setup_tracing("cave-test", 1.0, env={})
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # would see any recorded span
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    async with tracing_client(provider) as client:
        response = await client.get("/api/v1/sandboxes/sbx_1", headers={"traceparent": traceparent})

    assert response.json()["trace_id"] == TRACE_ID  # for logs and downstream calls
    assert exporter.get_finished_spans() == ()


def test_setup_does_not_replace_the_process_wide_provider(
    exporter: InMemorySpanExporter,
) -> None:
    provider = setup_tracing("cave-test", 1.0, exporter)

    assert trace.get_tracer_provider() is not provider


@pytest.mark.parametrize(
    ("raw", "expected", "warned"),
    [
        (None, DEFAULT_SAMPLING_RATE, False),
        ("", DEFAULT_SAMPLING_RATE, False),
        ("0.25", 0.25, False),
        ("0", 0.0, False),
        ("1", 1.0, False),
        ("1.5", 1.0, True),
        ("-2", 0.0, True),
        ("inf", 1.0, True),
        ("abc", DEFAULT_SAMPLING_RATE, True),
        ("nan", DEFAULT_SAMPLING_RATE, True),
    ],
)
def test_sampling_rate_is_clamped_to_a_fraction_with_a_warning(
    raw: str | None, expected: float, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    env = {} if raw is None else {"CAVE_OTEL_SAMPLING_RATE": raw}

    with caplog.at_level(logging.WARNING, logger="cave.api"):
        assert load_sampling_rate(env) == expected

    warnings = [r for r in caplog.records if r.name == "cave.api"]
    assert bool(warnings) is warned
    if warned:
        assert "CAVE_OTEL_SAMPLING_RATE" in warnings[0].getMessage()


def test_no_exporter_without_an_otlp_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deployments.http.tracing"):
        assert select_exporter({}) is None
    assert caplog.records == []


def test_an_otlp_endpoint_gets_an_exporter_when_the_package_is_installed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    try:
        installed = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:  # a parent package is missing
        installed = False

    with caplog.at_level(logging.WARNING, logger="deployments.http.tracing"):
        exporter = select_exporter(env)

    if installed:
        assert exporter is not None
        assert type(exporter).__name__ == "OTLPSpanExporter"
        exporter.shutdown()
    else:
        assert exporter is None
        assert "traces are not exported" in caplog.text
