"""OpenTelemetry tracing of the API: sampling rate, tracer provider, server-span middleware.

The child spans of the services (`span`) are deployments/spans.py's."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cave.settings_env import load_section
from config.api import TracingSettings
from deployments.http.metrics import UNMATCHED, route_template, status_of
from deployments.spans import TRACER_NAME, reset_tracer, use_tracer

log = logging.getLogger(__name__)

# Probes and scrapes every few seconds would drown the traces worth reading.
DEFAULT_EXCLUDED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
_OTLP_MODULES = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}


def load_sampling_rate(env: Mapping[str, str]) -> float:
    """`CAVE_OTEL_SAMPLING_RATE` as a fraction in [0, 1]; out of range is clamped with a warning
    (config.api.TracingSettings)."""
    return load_section(TracingSettings, env).sampling_rate


def select_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    """An OTLP exporter when an endpoint is set and its package is installed, else None."""
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not traces_endpoint and not endpoint:
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or ""
    ).strip() or "http/protobuf"
    module_name = _OTLP_MODULES.get(protocol)
    if module_name is None:
        log.warning("OTLP protocol %r is not supported; traces are not exported", protocol)
        return None
    try:
        exporter_class = importlib.import_module(module_name).OTLPSpanExporter
    except ImportError:
        package = module_name.rsplit(".", 2)[0]
        log.warning("an OTLP endpoint is set but %s is missing; traces are not exported", package)
        return None
    if not traces_endpoint and protocol == "http/protobuf":
        # The generic endpoint is a base URL; the signal path is added (OTLP exporter spec).
        traces_endpoint = endpoint.rstrip("/") + "/v1/traces"
    exporter: SpanExporter = exporter_class(endpoint=traces_endpoint or endpoint)
    return exporter


def setup_tracing(
    service_name: str,
    rate: float,
    exporter: SpanExporter | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> TracerProvider:
    """A tracer provider sampling `rate` of new traces and following a caller's decision.

    Without `exporter`, the one `select_exporter` finds in `env` (default `os.environ`); with
    none at all, no span is recorded. The provider is not made global: pass it to
    `install_tracing` (docs/observability.md says why).
    """
    sampler: Sampler = ParentBased(TraceIdRatioBased(rate))
    if exporter is None:
        exporter = select_exporter(os.environ if env is None else env)
    if exporter is None:
        # Recorded spans would go nowhere. Unrecorded ones still carry a caller's trace id to
        # `current_trace_id()` (logs) at a third of the cost per request.
        sampler = ALWAYS_OFF
    provider = TracerProvider(
        sampler=sampler, resource=Resource.create({"service.name": service_name})
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


_HEADER_NAMES = {key: key.encode() for key in ("traceparent", "tracestate", "baggage")}


class _AsgiHeaders(Getter[list[tuple[bytes, bytes]]]):
    """Reads propagation headers straight from the ASGI list; servers send names lower-case."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = _HEADER_NAMES.get(key) or key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_ASGI_HEADERS = _AsgiHeaders()


class TracingMiddleware:
    """One SERVER span per HTTP request or WebSocket session, named `"{method} {route}"`."""

    def __init__(
        self,
        app: ASGIApp,
        tracer_provider: trace.TracerProvider,
        excluded_paths: frozenset[str] = DEFAULT_EXCLUDED_PATHS,
    ) -> None:
        self.app = app
        self.tracer = tracer_provider.get_tracer(TRACER_NAME)
        self.excluded_paths = excluded_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root_path: str = scope.get("root_path", "")
        if scope["type"] not in ("http", "websocket") or _route_path(scope) in self.excluded_paths:
            await self.app(scope, receive, send)
            return
        is_websocket = scope["type"] == "websocket"
        method = "WS" if is_websocket else _span_method(scope["method"])
        # A `traceparent` header wins; without one, an ambient context (Serve's own tracing)
        # stays the parent.
        parent = propagate.extract(
            scope["headers"], context=otel_context.get_current(), getter=_ASGI_HEADERS
        )
        server_span = self.tracer.start_span(
            method, parent, SpanKind.SERVER, _request_attributes(scope, is_websocket)
        )
        response = _Response()

        async def send_and_note(message: Message) -> None:
            response.status = status_of(message, response.status)
            if message["type"] == "http.response.start":
                response.headers = message.get("headers", [])
            await send(message)

        context_token = otel_context.attach(trace.set_span_in_context(server_span, parent))
        tracer_token = use_tracer(self.tracer)
        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            server_span.record_exception(exc)
            server_span.set_attribute("error.type", type(exc).__qualname__)
            server_span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            raise
        else:
            if response.status >= 500:
                server_span.set_status(Status(StatusCode.ERROR))  # a 4xx is the client's error
        finally:
            reset_tracer(tracer_token)
            otel_context.detach(context_token)
            if server_span.is_recording():
                _finish(server_span, scope, root_path, method, response)
            server_span.end()


class _Response:
    """What the app answered, as seen on its way out."""

    __slots__ = ("status", "headers")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []


def _span_method(method: str) -> str:
    return method if method in _METHODS else "HTTP"  # semantic conventions: unknown is "HTTP"


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


def _request_attributes(scope: Scope, is_websocket: bool) -> dict[str, AttributeValue]:
    # Never the query string: the WebSocket route takes the API key as `access_token` there.
    attributes: dict[str, AttributeValue] = {
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "ws" if is_websocket else "http"),
    }
    if is_websocket:
        attributes["network.protocol.name"] = "websocket"
    else:
        method = scope["method"]
        attributes["http.request.method"] = method if method in _METHODS else "_OTHER"
        if method not in _METHODS:
            attributes["http.request.method_original"] = method
        attributes["network.protocol.version"] = scope.get("http_version", "1.1")
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
    return attributes


def _finish(span: Span, scope: Scope, root_path: str, method: str, response: _Response) -> None:
    attributes: dict[str, AttributeValue] = {}
    route = route_template(scope, root_path)
    if route != UNMATCHED:  # unmatched: the name stays the bare method (semantic conventions)
        span.update_name(f"{method} {route}")
        attributes["http.route"] = route
    if response.status:
        attributes["http.response.status_code"] = response.status
    request_id = _request_id(scope, response.headers)
    if request_id:
        attributes["cave.request_id"] = request_id
    span.set_attributes(attributes)


def _request_id(scope: Scope, response_headers: list[tuple[bytes, bytes]]) -> str | None:
    """The id the app settled on (scope state), else the one it answered, else the one sent."""
    state = scope.get("state")
    if isinstance(state, Mapping) and isinstance(state.get("request_id"), str):
        return str(state["request_id"])
    for headers in (response_headers, scope["headers"]):
        for name, value in headers:
            if name.lower() == b"x-request-id":
                return str(value.decode("latin-1"))
    return None


def install_tracing(
    app: Starlette,
    tracer_provider: trace.TracerProvider,
    excluded_paths: frozenset[str] = DEFAULT_EXCLUDED_PATHS,
) -> None:
    """Add `TracingMiddleware` to `app` (before the app serves its first request)."""
    app.add_middleware(
        TracingMiddleware, tracer_provider=tracer_provider, excluded_paths=excluded_paths
    )
