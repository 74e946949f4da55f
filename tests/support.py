"""Helpers shared by test packages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    check: Callable[[], T], timeout_s: float = 10.0, what: str = "condition", every_s: float = 0.02
) -> T:
    """Call `check` until it returns something truthy (returned), failing past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        last: Exception | None = None
        try:
            value = check()
        except (OSError, ConnectionError) as exc:  # a server not listening yet
            value, last = None, exc  # type: ignore[assignment]
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout_s}s ({last})"
        time.sleep(every_s)
