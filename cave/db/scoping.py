"""Who a session acts for (a namespace, the admin, or nobody) and the ORM filter that follows.

PostgreSQL enforces the same rule with row-level security, for hand-written SQL too; SQLite has no
RLS, so there this ORM filter is the only guard and raw `text()` SQL is not filtered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, false
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction, with_loader_criteria

from cave.db.models import Base, NamespaceOwned, NamespaceRow, OutboxRow, SigningKeyRow
from cave.errors import NamespaceMismatchError

_SCOPE_KEY = "cave.scope"


@dataclass(frozen=True, slots=True)
class Scope:
    """The rows a session may touch: one namespace's, all of them (admin), or none (neither)."""

    namespace_id: str | None = None
    admin: bool = False


NOBODY = Scope()
ADMIN = Scope(admin=True)


def scope_of(session: Session | AsyncSession) -> Scope:
    """The scope a session was opened with: what a repository function may assume."""
    scope = session.info.get(_SCOPE_KEY, NOBODY)
    assert isinstance(scope, Scope)
    return scope


class ScopedSession(Session):
    """The ORM session class behind every CAVE session; filters by its scope."""


def bind_scope(session: Session, scope: Scope) -> None:
    session.info[_SCOPE_KEY] = scope


@event.listens_for(ScopedSession, "do_orm_execute")
def _filter_reads(state: ORMExecuteState) -> None:
    scope = scope_of(state.session)
    if scope.admin or state.is_column_load or state.is_relationship_load:
        return
    if not (state.is_select or state.is_update or state.is_delete):
        return
    state.statement = state.statement.options(*_criteria(scope.namespace_id))


def _criteria(namespace: str | None) -> list[Any]:
    if namespace is None:
        # `namespace_id == None` would compile to IS NULL and show admin keys: deny outright.
        rows: list[type[Any]] = [*_owned_rows(), NamespaceRow, OutboxRow, SigningKeyRow]
        return [_where(row, false()) for row in rows]
    return [
        *(_where(row, row.namespace_id == namespace) for row in _owned_rows()),
        _where(NamespaceRow, NamespaceRow.id == namespace),
        _where(OutboxRow, false()),
        _where(SigningKeyRow, false()),
    ]


def _where(row: type[Any], condition: Any) -> Any:
    return with_loader_criteria(row, condition, include_aliases=True)


def _owned_rows() -> list[type[Any]]:
    # Every mapped class that carries the marker, looked up once the mappers are configured.
    return [m.class_ for m in Base.registry.mappers if issubclass(m.class_, NamespaceOwned)]


@event.listens_for(ScopedSession, "before_flush")
def _check_writes(session: Session, flush: UOWTransaction, instances: Any) -> None:
    scope = scope_of(session)
    if scope.admin:
        return
    for row in [*session.new, *session.dirty]:
        owner = _owner(row, is_new=row in session.new)
        if owner is _ANYONE or (owner is not None and owner == scope.namespace_id):
            continue
        raise NamespaceMismatchError(
            f"{type(row).__name__} of namespace {owner!r} written "
            f"in a session of namespace {scope.namespace_id!r}"
        )


_ANYONE = object()


def _owner(row: object, *, is_new: bool) -> object:
    """The namespace a row belongs to (None: nobody's but the admin's), or _ANYONE."""
    if isinstance(row, NamespaceOwned):
        return getattr(row, "namespace_id", None)
    if isinstance(row, NamespaceRow):
        return row.id
    if isinstance(row, SigningKeyRow):
        return None  # the admin's alone: sealed private keys
    if isinstance(row, OutboxRow):
        # Any transaction may enqueue an event (e.g. a key rotation); only the admin reads them.
        return _ANYONE if is_new else None
    return _ANYONE
