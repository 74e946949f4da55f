"""Log lines of an API replica carry the request id of the request they were written for."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

current_request_id: ContextVar[str] = ContextVar("cave_request_id", default="-")
FORMAT = "%(asctime)s %(levelname)s %(name)s [request %(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current request's, or "-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


def configure_logging(level: int = logging.INFO) -> logging.Handler:
    """A stderr handler on the `cave` logger tree with the request id in each line; idempotent.

    For replica processes only: it stops `cave.*` records from also reaching the root logger."""
    root = logging.getLogger("cave")
    for handler in root.handlers:
        if getattr(handler, "cave_request_ids", False):
            return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    handler.cave_request_ids = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # Serve's own handlers would print each line a second time
    return handler
