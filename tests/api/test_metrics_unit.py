"""The Prometheus metrics of the API, on a small FastAPI app with the real middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from deployments.http.metrics import ApiMetrics, install_metrics
from deployments.sandboxes.views import exec_outcome

pytestmark = pytest.mark.anyio

SANDBOX_ROUTE = "/api/v1/sandboxes/{sandbox_id}"
Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SandboxMissing(Exception):
    pass


def build_app(metrics: ApiMetrics) -> FastAPI:
    """Routes shaped like CAVE's: a prefixed router, an error handler, a stream, a WebSocket."""
    app = FastAPI()
    router = APIRouter(prefix="/api/v1")

    @router.get("/sandboxes/{sandbox_id}")
    async def get_sandbox(sandbox_id: str) -> dict[str, str]:
        if sandbox_id == "missing":
            raise SandboxMissing
        return {"id": sandbox_id}

    @router.get("/sandboxes/{sandbox_id}/stream")
    async def stream(sandbox_id: str) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"line {i}\n".encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @router.post("/boom")
    async def boom() -> None:
        raise RuntimeError("unexpected")

    @router.websocket("/sandboxes/{sandbox_id}/exec/ws")
    async def exec_ws(websocket: WebSocket, sandbox_id: str) -> None:
        if sandbox_id == "denied":
            await websocket.close(code=1008)
            return
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    @app.exception_handler(SandboxMissing)
    async def missing(request: Request, exc: SandboxMissing) -> JSONResponse:
        metrics.count_error("sandbox_not_found")
        return JSONResponse({"error": {"code": "sandbox_not_found"}}, status_code=404)

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.path_params["item_id"])

    app.include_router(router)
    app.mount("/sub", Starlette(routes=[Route("/items/{item_id}", item)]))
    app.mount("/raw", PlainTextResponse("raw"))
    app.router.routes.append(Route("/mcp", PlainTextResponse("an ASGI app, as the MCP endpoint")))
    install_metrics(app, metrics)
    return app


@pytest.fixture
def metrics() -> ApiMetrics:
    return ApiMetrics()


@pytest.fixture
async def client(metrics: ApiMetrics) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(metrics), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cave") as client:
        yield client


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of GET /metrics, parsed as Prometheus does, keyed by name and labels."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def parse(body: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def requests_total(samples: Samples, method: str, route: str, status: str) -> float | None:
    return sample(samples, "cave_http_requests_total", method=method, route=route, status=status)


async def test_requests_are_labelled_by_route_template_not_raw_path(
    client: httpx.AsyncClient,
) -> None:
    for sandbox_id in ("sbx_1", "sbx_2", "sbx_3"):
        assert (await client.get(f"/api/v1/sandboxes/{sandbox_id}")).status_code == 200

    samples = await scrape(client)
    labels = {"method": "GET", "route": SANDBOX_ROUTE}
    assert sample(samples, "cave_http_requests_total", status="200", **labels) == 3
    assert sample(samples, "cave_http_request_duration_seconds_count", **labels) == 3
    assert sample(samples, "cave_http_request_duration_seconds_bucket", le="30.0", **labels) == 3
    assert not any("sbx_" in value for _, pairs in samples for _, value in pairs)


async def test_unknown_paths_are_one_unmatched_series(client: httpx.AsyncClient) -> None:
    for path in ("/nope", "/nope/1", "/api/v1/sandboxes/sbx_1/nothing/here"):
        assert (await client.get(path)).status_code == 404

    samples = await scrape(client)
    assert requests_total(samples, "GET", "unmatched", "404") == 3


async def test_a_404_of_a_known_route_keeps_its_template_and_counts_the_error_code(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/api/v1/sandboxes/missing")).status_code == 404

    samples = await scrape(client)
    assert requests_total(samples, "GET", SANDBOX_ROUTE, "404") == 1
    assert sample(samples, "cave_errors_total", code="sandbox_not_found") == 1


async def test_an_unhandled_exception_counts_as_500(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/v1/boom")).status_code == 500

    samples = await scrape(client)
    assert requests_total(samples, "POST", "/api/v1/boom", "500") == 1


async def test_a_stream_arrives_whole_and_is_counted(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/sandboxes/sbx_1/stream")

    assert response.text == "line 0\nline 1\nline 2\n"
    samples = await scrape(client)
    route = "/api/v1/sandboxes/{sandbox_id}/stream"
    assert requests_total(samples, "GET", route, "200") == 1


async def test_mounts_and_plain_routes_are_labelled_by_template(client: httpx.AsyncClient) -> None:
    assert (await client.get("/sub/items/42")).text == "42"
    assert (await client.get("/raw/anything/at/all")).text == "raw"
    assert (await client.post("/mcp")).status_code == 200

    samples = await scrape(client)
    assert requests_total(samples, "GET", "/sub/items/{item_id}", "200") == 1
    assert requests_total(samples, "GET", "/raw/{path}", "200") == 1
    assert requests_total(samples, "POST", "/mcp", "200") == 1


async def test_unknown_methods_do_not_mint_label_values(client: httpx.AsyncClient) -> None:
    await client.request("BREW", "/api/v1/sandboxes/sbx_1")

    samples = await scrape(client)
    assert requests_total(samples, "OTHER", SANDBOX_ROUTE, "405") == 1


def test_websocket_sessions_are_counted_with_method_ws(metrics: ApiMetrics) -> None:
    with TestClient(build_app(metrics)) as client:
        with client.websocket_connect("/api/v1/sandboxes/sbx_1/exec/ws") as websocket:
            websocket.send_text("hello")
            assert websocket.receive_text() == "hello"
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect("/api/v1/sandboxes/denied/exec/ws"),
        ):
            pass
        body = client.get("/metrics").text

    samples = parse(body)
    route = "/api/v1/sandboxes/{sandbox_id}/exec/ws"
    assert requests_total(samples, "WS", route, "101") == 1
    assert requests_total(samples, "WS", route, "403") == 1


async def test_exec_outcomes_and_durations(client: httpx.AsyncClient, metrics: ApiMetrics) -> None:
    metrics.observe_exec("ok", 0.2)
    metrics.observe_exec("ok", 0.3)
    metrics.observe_exec("timed_out", 61.0)

    samples = await scrape(client)
    assert sample(samples, "cave_execs_total", outcome="ok") == 2
    assert sample(samples, "cave_execs_total", outcome="timed_out") == 1
    assert sample(samples, "cave_execs_total", outcome="oom_killed") == 0  # present from the start
    assert sample(samples, "cave_exec_duration_seconds_count") == 3
    assert sample(samples, "cave_exec_duration_seconds_bucket", le="60.0") == 2


def test_exec_outcome_of_a_result_and_unknown_outcomes(metrics: ApiMetrics) -> None:
    assert exec_outcome(exit_code=0, timed_out=False, oom_killed=False) == "ok"
    assert exec_outcome(exit_code=2, timed_out=False, oom_killed=False) == "nonzero"
    assert exec_outcome(exit_code=137, timed_out=False, oom_killed=True) == "oom_killed"
    assert exec_outcome(exit_code=-9, timed_out=True, oom_killed=False) == "timed_out"
    with pytest.raises(ValueError, match="unknown exec outcome"):
        metrics.observe_exec("crashed", 1.0)  # type: ignore[arg-type]


async def test_sandbox_gauge_is_counted_at_each_scrape(
    client: httpx.AsyncClient, metrics: ApiMetrics
) -> None:
    counts = {"running": 3, "stopped": 1}

    async def count_sandboxes() -> dict[str, int]:
        return dict(counts)

    metrics.set_sandbox_counter(count_sandboxes)
    samples = await scrape(client)
    assert sample(samples, "cave_sandboxes", state="running") == 3
    assert sample(samples, "cave_sandboxes", state="stopped") == 1

    counts.pop("stopped")
    counts["running"] = 2
    samples = await scrape(client)
    assert sample(samples, "cave_sandboxes", state="running") == 2
    assert sample(samples, "cave_sandboxes", state="stopped") == 0  # zero, not a gap


async def test_a_sync_sandbox_counter_works_too(
    client: httpx.AsyncClient, metrics: ApiMetrics
) -> None:
    metrics.set_sandbox_counter(lambda: {"created": 5})

    assert sample(await scrape(client), "cave_sandboxes", state="created") == 5


async def test_a_failing_sandbox_count_leaves_the_other_metrics_and_no_stale_gauge(
    client: httpx.AsyncClient, metrics: ApiMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = True

    async def count_sandboxes() -> dict[str, int]:
        if not healthy:
            raise ConnectionError("database down")
        return {"running": 4}

    metrics.set_sandbox_counter(count_sandboxes)
    assert sample(await scrape(client), "cave_sandboxes", state="running") == 4

    healthy = False
    with caplog.at_level(logging.WARNING, logger="deployments.http.metrics"):
        samples = await scrape(client)
    assert sample(samples, "cave_sandboxes", state="running") is None
    assert sample(samples, "cave_sandbox_count_failures_total") == 1
    assert requests_total(samples, "GET", "/metrics", "200") == 1  # the scrape before this one
    assert "counting sandboxes for /metrics failed" in caplog.text


async def test_each_app_has_its_own_registry() -> None:
    first, second = ApiMetrics(), ApiMetrics()
    first_app, second_app = build_app(first), build_app(second)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=first_app), base_url="http://a") as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=second_app), base_url="http://b") as b,
    ):
        await a.get("/api/v1/sandboxes/sbx_1")
        assert requests_total(await scrape(a), "GET", SANDBOX_ROUTE, "200") == 1
        assert requests_total(await scrape(b), "GET", SANDBOX_ROUTE, "200") is None


async def test_metrics_route_stays_out_of_the_openapi_schema(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()

    assert "/metrics" not in schema["paths"]
    assert SANDBOX_ROUTE in schema["paths"]
