"""Child spans for the services of every wing; the HTTP middleware opens each request's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer
from opentelemetry.util.types import AttributeValue

TRACER_NAME = "cave.api"
# The tracer of the request being served, so that `span()` reports to the app's own provider
# even when several apps (tests) share a process and none is the global provider.
_current_tracer: ContextVar[Tracer | None] = ContextVar("cave_tracer", default=None)


def use_tracer(tracer: Tracer) -> Token[Tracer | None]:
    """Make `tracer` the one `span()` uses in this context; give the token to `reset_tracer`."""
    return _current_tracer.set(tracer)


def reset_tracer(token: Token[Tracer | None]) -> None:
    _current_tracer.reset(token)


@contextmanager
def span(name: str, /, **attrs: AttributeValue | None) -> Iterator[Span]:
    """A child span of the current one, e.g. `with span("sandbox.exec", sandbox_id=sid):`.

    Plain keyword names become `cave.<name>` attributes; dotted ones (passed as `**{"a.b": v}`)
    are kept as they are; None values are left out. An exception marks the span as an error.
    """
    tracer = _current_tracer.get() or trace.get_tracer(TRACER_NAME)
    attributes = {
        key if "." in key else f"cave.{key}": value
        for key, value in attrs.items()
        if value is not None
    }
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def current_trace_id() -> str | None:
    """The current trace's id in hex (for logs and error reports), or None outside a trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
