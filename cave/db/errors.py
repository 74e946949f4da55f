"""Translation of SQLAlchemy and driver errors into the CAVE tree, at the cave/db boundary.

```
IntegrityError (unique, foreign key, check)        -> ConflictError
row-level security refused a row (42501 + RLS)      -> NamespaceMismatchError
SQLite busy ("database is locked"), pool exhausted   -> OverloadedError (429, retry)
lost/refused connection, admin shutdown, timeouts   -> DatabaseUnavailableError
anything else (a bug in our SQL)                    -> unchanged
```
"""

from __future__ import annotations

import functools
import inspect
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, cast

from sqlalchemy import exc as sa_exc

from cave.errors import (
    CaveError,
    ConflictError,
    DatabaseUnavailableError,
    NamespaceMismatchError,
    OverloadedError,
)

_F = TypeVar("_F", bound=Callable[..., Any])

# SQLSTATEs that mean "the server or the connection is gone", whatever class the driver chose.
_UNAVAILABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300", "53400")
# Raised unwrapped when the pool opens a new connection (refused, reset, DNS, connect timeout).
# Not every OSError: a FileNotFoundError of the caller's own code is no database outage.
_LOST = (
    sa_exc.DisconnectionError,
    ConnectionError,
    TimeoutError,
    socket.gaierror,
)


def translate_error(error: BaseException) -> CaveError | None:
    """The CAVE error that `error` means, or None when it is not ours to translate."""
    if isinstance(error, sa_exc.IntegrityError):
        return ConflictError(f"conflicts with existing data: {reason(error)}")
    if isinstance(error, sa_exc.TimeoutError) or _busy(error):
        # Every connection is in use, or another process held SQLite's write lock past the busy
        # timeout: load, not an outage.
        return overloaded(f"the database is busy ({reason(error)})")
    if isinstance(error, sa_exc.DBAPIError):
        state = _sqlstate(error)
        if state == "42501" and "row-level security" in reason(error):
            return NamespaceMismatchError(f"row belongs to another namespace: {reason(error)}")
        if error.connection_invalidated or _unavailable(error, state):
            return DatabaseUnavailableError(f"database unavailable: {reason(error)}")
        return None
    if isinstance(error, _LOST):
        return DatabaseUnavailableError(f"database unavailable: {reason(error)}")
    return None


def overloaded(why: str) -> OverloadedError:
    """The database's writes are queued past their wait: a 429 with Retry-After, nothing written."""
    return OverloadedError(
        f"{why}; nothing was written, retry shortly", quota="database_writes", retry_after_s=1.0
    )


def _busy(error: BaseException) -> bool:
    """SQLite's SQLITE_BUSY / SQLITE_LOCKED, whichever words the driver uses."""
    return isinstance(error, sa_exc.OperationalError) and "is locked" in reason(error)


def reason(error: BaseException) -> str:
    """The driver's own words for `error`: first line plus DETAIL, without SQL or parameters."""
    inner: BaseException = error
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        inner = error.orig.__cause__ or error.orig
    lines = str(inner).strip().splitlines() or [type(inner).__name__]
    detail = getattr(inner, "detail", None)
    return f"{lines[0]} ({detail})" if detail else lines[0]


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    state = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return state if isinstance(state, str) else None


def _unavailable(error: sa_exc.DBAPIError, state: str | None) -> bool:
    if state is not None:
        return state.startswith(_UNAVAILABLE_STATES)
    # SQLite: "database is locked", "disk I/O error", "unable to open database file".
    return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)


def translate_errors() -> ErrorTranslator:
    """`with`, `async with` or `@decorator`: database errors inside leave as CAVE errors."""
    return ErrorTranslator()


class ErrorTranslator:
    """Raises the translation of a database error that leaves its block or function."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None or isinstance(error, CaveError):
            return
        translated = translate_error(error)
        if translated is not None:
            raise translated from error

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(kind, error, traceback)

    def __call__(self, function: _F) -> _F:
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return await function(*args, **kwargs)

            return cast(_F, run_async)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self:
                return function(*args, **kwargs)

        return cast(_F, run)
