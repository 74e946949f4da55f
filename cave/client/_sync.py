"""`Cave`, the blocking client: sandboxes, their commands and files, and API keys."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from cave.client import _routes as routes
from cave.client._models import (
    ApiKey,
    CreatedApiKey,
    ExecEvent,
    ExecResult,
    FileList,
    FileWritten,
    KeyKind,
    Limits,
    SandboxInfo,
    SandboxPage,
    SandboxState,
)
from cave.client._transport import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    ClientConfig,
    SyncTransport,
)


class Cave:
    """A client of one CAVE API; its connections are pooled and kept alive until `close()`.

    `base_url` and `api_key` default to $CAVE_API_URL and $CAVE_API_KEY.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        config = ClientConfig.resolve(base_url, api_key, timeout, max_retries)
        self._transport = SyncTransport(config, http_client)
        self.sandboxes = Sandboxes(self._transport)
        self.keys = Keys(self._transport)

    @property
    def base_url(self) -> str:
        return self._transport.config.base_url

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Cave:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Sandboxes:
    """`client.sandboxes`: every call takes the sandbox's id; `Sandbox` wraps them for one."""

    def __init__(self, transport: SyncTransport) -> None:
        self._transport = transport

    def create(
        self,
        *,
        name: str = "",
        limits: Limits | dict[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        idle_timeout_s: float | None = None,
        namespace: str | None = None,
        start: bool = True,
        pool: str | None = None,
        wait_s: float | None = None,
    ) -> Sandbox:
        """A new sandbox, started unless `start` is False. `pool`: the node pool to place it in
        (its `cave.pool` label). When every node of its pool is full the create fails at once
        with CapacityError, or with `wait_s` waits that long for room while the server asks
        the autoscaler for a node."""
        call = routes.create_sandbox(
            name=name,
            limits=limits,
            labels=labels,
            ttl_s=ttl_s,
            idle_timeout_s=idle_timeout_s,
            namespace=namespace,
            start=start,
            pool=pool,
            wait_s=wait_s,
        )
        return Sandbox(self._transport.send(call), self)

    def list(
        self,
        *,
        state: SandboxState | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        namespace: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SandboxPage:
        """One page, newest first; pass its `next_cursor` as `cursor` for the next."""
        call = routes.list_sandboxes(
            state=state, name=name, labels=labels, namespace=namespace, limit=limit, cursor=cursor
        )
        return self._transport.send(call)

    def iter_all(
        self,
        *,
        state: SandboxState | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        namespace: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[SandboxInfo]:
        """Every matching sandbox, page after page."""
        cursor: str | None = None
        while True:
            page = self.list(
                state=state,
                name=name,
                labels=labels,
                namespace=namespace,
                limit=page_size,
                cursor=cursor,
            )
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def get(self, sandbox_id: str) -> Sandbox:
        return Sandbox(self._transport.send(routes.get_sandbox(sandbox_id)), self)

    def start(self, sandbox_id: str) -> Sandbox:
        return Sandbox(self._transport.send(routes.start_sandbox(sandbox_id)), self)

    def stop(self, sandbox_id: str) -> Sandbox:
        return Sandbox(self._transport.send(routes.stop_sandbox(sandbox_id)), self)

    def delete(self, sandbox_id: str) -> None:
        self._transport.send(routes.delete_sandbox(sandbox_id))

    def exec(
        self,
        sandbox_id: str,
        command: str | builtins.list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        """Run a command (a str under /bin/sh -c, a list as argv) and wait for its result."""
        call = routes.exec_command(
            sandbox_id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        )
        return self._transport.send(call)

    def exec_stream(
        self,
        sandbox_id: str,
        command: str | builtins.list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[ExecEvent]:
        """`OutputChunk`s as the command writes them, then its `ExecResult`.

        The request is sent on the first `next()`; to stop early, `close()` the iterator.
        """
        call = routes.exec_command(
            sandbox_id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, stream=True
        )
        return self._transport.events(call)

    def write_file(self, sandbox_id: str, path: str, data: bytes | str) -> FileWritten:
        """Create or replace a file in the workspace; a str is written as UTF-8."""
        return self._transport.send(routes.write_file(sandbox_id, path, data))

    def read_file(self, sandbox_id: str, path: str) -> bytes:
        return self._transport.send(routes.read_file(sandbox_id, path))

    def list_files(self, sandbox_id: str, path: str = "") -> FileList:
        return self._transport.send(routes.list_files(sandbox_id, path))

    def delete_file(self, sandbox_id: str, path: str, recursive: bool = False) -> None:
        self._transport.send(routes.delete_file(sandbox_id, path, recursive))


class Sandbox:
    """One sandbox: its last known `info` and the calls that act on it.

    As a context manager it deletes the sandbox on exit.
    """

    def __init__(self, info: SandboxInfo, sandboxes: Sandboxes) -> None:
        self.info = info
        self.api_key = info.api_key  # only the create answer has it; refresh() keeps it
        self._sandboxes = sandboxes

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> SandboxState:
        return self.info.state

    def refresh(self) -> Sandbox:
        self.info = self._sandboxes.get(self.id).info
        return self

    def start(self) -> Sandbox:
        self.info = self._sandboxes.start(self.id).info
        return self

    def stop(self) -> Sandbox:
        self.info = self._sandboxes.stop(self.id).info
        return self

    def delete(self) -> None:
        self._sandboxes.delete(self.id)

    def exec(
        self,
        command: str | list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        return self._sandboxes.exec(
            self.id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        )

    def exec_stream(
        self,
        command: str | list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[ExecEvent]:
        return self._sandboxes.exec_stream(
            self.id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        )

    def write_file(self, path: str, data: bytes | str) -> FileWritten:
        return self._sandboxes.write_file(self.id, path, data)

    def read_file(self, path: str) -> bytes:
        return self._sandboxes.read_file(self.id, path)

    def list_files(self, path: str = "") -> FileList:
        return self._sandboxes.list_files(self.id, path)

    def delete_file(self, path: str, recursive: bool = False) -> None:
        self._sandboxes.delete_file(self.id, path, recursive)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, name={self.info.name!r}, state={self.state!r})"


class Keys:
    """`client.keys`: API keys; a full key is only ever in the answer that made it."""

    def __init__(self, transport: SyncTransport) -> None:
        self._transport = transport

    def create(
        self,
        *,
        kind: KeyKind = "namespace",
        namespace: str | None = None,
        scopes: builtins.list[str] | None = None,
        name: str = "",
        ttl_s: float | None = None,
    ) -> CreatedApiKey:
        call = routes.create_key(
            kind=kind, namespace=namespace, scopes=scopes, name=name, ttl_s=ttl_s
        )
        return self._transport.send(call)

    def list(self, namespace: str | None = None) -> builtins.list[ApiKey]:
        return self._transport.send(routes.list_keys(namespace))

    def revoke(self, key_id: str) -> None:
        self._transport.send(routes.revoke_key(key_id))

    def rotate(self, key_id: str, grace_s: float | None = None) -> CreatedApiKey:
        """A new key replacing this one; the old one keeps working for `grace_s`."""
        return self._transport.send(routes.rotate_key(key_id, grace_s))
