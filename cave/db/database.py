"""The Database object: engine, start-up migration and the three kinds of transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import Literal, Self

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from cave.db.errors import overloaded, reason, translate_errors
from cave.db.migrate import head_revision, upgrade
from cave.db.scoping import ADMIN, NOBODY, Scope, ScopedSession, bind_scope
from cave.db.settings import DatabaseSettings
from cave.db.sqlite import READ_ONLY_OPTION, create_sqlite_engine, startup_lock
from cave.errors import DatabaseUnavailableError, InvalidArgumentError

log = logging.getLogger(__name__)

# The role without BYPASSRLS that every transaction runs as on PostgreSQL (see the migration).
APP_ROLE = "cave_app"
_ENTER_SCOPE = text(
    "SELECT set_config('cave.namespace', :namespace, true),"
    " set_config('cave.admin', :admin, true),"
    f" set_config('role', '{APP_ROLE}', true)"
)


# Set for a task (a request) once it has written, or once it starts work that must be recorded:
# its later writes wait for their turn however long, not refused as overload (see _wait_for).
_admitted: ContextVar[bool] = ContextVar("cave_db_admitted", default=False)


def admitted() -> None:
    """This task has begun work that its writes must record (a command run in a sandbox): from
    here on they wait for their turn instead of being refused as overload, which would leave it
    done but unrecorded, or half made."""
    _admitted.set(True)


class Database:
    """The connection pool and its sessions; built once at the entry point and passed down."""

    def __init__(self, engine: AsyncEngine, settings: DatabaseSettings) -> None:
        """Use `await Database.connect(settings)`, which also migrates."""
        self._engine = engine
        self._settings = settings
        self._postgres = engine.dialect.name == "postgresql"
        self._sessions = async_sessionmaker(
            engine, expire_on_commit=False, sync_session_class=ScopedSession
        )
        # Reads need no write lock: on SQLite they begin DEFERRED and, in WAL mode, never wait
        # for a writer (see sqlite.py); on PostgreSQL the option changes nothing.
        self._read_sessions = async_sessionmaker(
            engine.execution_options(**{READ_ONLY_OPTION: True}),
            expire_on_commit=False,
            sync_session_class=ScopedSession,
        )
        # SQLite has one writer at a time. This process's writers take turns here, in order,
        # instead of all polling SQLite's busy handler, which is unfair and which a burst of
        # writers outwaits ("database is locked"); other processes meet us at the file's lock.
        self._write_turn = None if self._postgres else asyncio.Lock()

    @classmethod
    async def connect(cls, settings: DatabaseSettings) -> Self:
        """Open the pool, check the server answers, migrate to head; clear errors otherwise."""
        engine = _create_engine(settings)
        try:
            async with _startup_lock(settings):
                await _probe(engine, settings)
                with translate_errors():
                    await upgrade(engine)
        except BaseException:
            await engine.dispose()
            raise
        log.info("database ready: %s, schema %s", settings.describe(), head_revision())
        return cls(engine, settings)

    @property
    def settings(self) -> DatabaseSettings:
        return self._settings

    @property
    def backend(self) -> Literal["postgresql", "sqlite"]:
        return self._settings.backend

    def session(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One transaction acting for nobody: tables without a namespace only (outbox inserts)."""
        return self._transaction(NOBODY)

    def admin_session(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One transaction that sees and may change every namespace's rows."""
        return self._transaction(ADMIN)

    def namespace_session(self, namespace_id: str) -> AbstractAsyncContextManager[AsyncSession]:
        """One transaction that sees and may change only the rows of `namespace_id`."""
        if not isinstance(namespace_id, str) or not namespace_id:
            raise InvalidArgumentError(f"namespace id must be a non-empty string: {namespace_id!r}")
        return self._transaction(Scope(namespace_id=namespace_id))

    def scoped_session(self, namespace_id: str | None) -> AbstractAsyncContextManager[AsyncSession]:
        """The namespace's transaction, or the admin's when namespace_id is None."""
        if namespace_id is None:
            return self.admin_session()
        return self.namespace_session(namespace_id)

    def read_session(self, namespace_id: str | None) -> AbstractAsyncContextManager[AsyncSession]:
        """A transaction for reading only (the admin's when namespace_id is None): it does not
        queue behind writers. Writing in it is a bug (SQLite may refuse with "busy")."""
        scope = ADMIN if namespace_id is None else Scope(namespace_id=namespace_id)
        return self._transaction(scope, read_only=True)

    @asynccontextmanager
    async def _transaction(
        self, scope: Scope, read_only: bool = False
    ) -> AsyncIterator[AsyncSession]:
        # Commits once when the block ends, rolls back when anything escapes it.
        sessions = self._read_sessions if read_only else self._sessions
        turn = self._write_turn if not read_only else None
        if turn is not None:
            await self._wait_for(turn)
        try:
            with translate_errors():
                async with sessions() as session:
                    bind_scope(session.sync_session, scope)
                    async with session.begin():
                        await self._checkout(session, read_only)
                        if self._postgres:
                            await session.execute(_ENTER_SCOPE, _scope_settings(scope))
                        yield session
        finally:
            if turn is not None:
                turn.release()

    async def _checkout(self, session: AsyncSession, read_only: bool) -> None:
        """A pooled connection for the transaction, taken before anything runs in it. Past the
        pool's timeout a task's first write is refused (translate_errors: overload, 429); an
        admitted task waits on, as on the SQLite queue (_wait_for)."""
        while True:
            try:
                await session.connection()
                break
            except sa_exc.TimeoutError:
                if not _admitted.get():
                    raise
        if not read_only:
            _admitted.set(True)

    async def _wait_for(self, turn: asyncio.Lock) -> None:
        """Overload is refused at the door: a task's first write that waits past write_wait_s
        fails with OverloadedError (429, nothing written). Once admitted, its later writes
        complete what it began (a sandbox inserted, then started), so they wait their turn."""
        if _admitted.get():
            await turn.acquire()
            return
        try:
            await asyncio.wait_for(turn.acquire(), self._settings.write_wait_s)
        except TimeoutError:
            wait_s = self._settings.write_wait_s
            raise overloaded(f"the database's writes are queued past {wait_s:g} s") from None
        _admitted.set(True)

    async def close(self) -> None:
        """Close every pooled connection; the object is unusable afterwards."""
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _scope_settings(scope: Scope) -> dict[str, str]:
    return {"namespace": scope.namespace_id or "", "admin": "on" if scope.admin else "off"}


def _create_engine(settings: DatabaseSettings) -> AsyncEngine:
    if settings.path is not None:
        return create_sqlite_engine(settings)
    return create_async_engine(
        settings.url(),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.write_wait_s,  # then a request is refused as overload (429)
        pool_pre_ping=True,  # a restarted server leaves dead connections in the pool
        connect_args={
            "timeout": settings.connect_timeout_s,
            "server_settings": {"application_name": "cave"},
        },
    )


def _startup_lock(settings: DatabaseSettings) -> AbstractAsyncContextManager[None]:
    # PostgreSQL takes its advisory lock inside the migration transaction.
    return nullcontext() if settings.path is None else startup_lock(settings.path)


async def _probe(engine: AsyncEngine, settings: DatabaseSettings) -> None:
    try:
        async with engine.connect():
            pass
    except Exception as error:  # refused, timed out, bad credentials: all "cannot connect"
        raise DatabaseUnavailableError(
            f"cannot connect to {settings.describe()}: {reason(error)}"
        ) from None
