"""`AsyncCave`, the asyncio (anyio) client: the same calls as `Cave`, awaited."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Mapping
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
    AsyncTransport,
    ClientConfig,
)


class AsyncCave:
    """A client of one CAVE API for async code; close it with `await aclose()` or `async with`.

    `base_url` and `api_key` default to $CAVE_API_URL and $CAVE_API_KEY.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        config = ClientConfig.resolve(base_url, api_key, timeout, max_retries)
        self._transport = AsyncTransport(config, http_client)
        self.sandboxes = AsyncSandboxes(self._transport)
        self.keys = AsyncKeys(self._transport)

    @property
    def base_url(self) -> str:
        return self._transport.config.base_url

    async def close(self) -> None:
        await self._transport.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncCave:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncSandboxes:
    """`client.sandboxes` of `AsyncCave`; see `Sandboxes` for what each call does."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._transport = transport

    async def create(
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
    ) -> AsyncSandbox:
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
        return AsyncSandbox(await self._transport.send(call), self)

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        namespace: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SandboxPage:
        call = routes.list_sandboxes(
            state=state, name=name, labels=labels, namespace=namespace, limit=limit, cursor=cursor
        )
        return await self._transport.send(call)

    async def iter_all(
        self,
        *,
        state: SandboxState | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        namespace: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[SandboxInfo]:
        cursor: str | None = None
        while True:
            page = await self.list(
                state=state,
                name=name,
                labels=labels,
                namespace=namespace,
                limit=page_size,
                cursor=cursor,
            )
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def get(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(await self._transport.send(routes.get_sandbox(sandbox_id)), self)

    async def start(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(await self._transport.send(routes.start_sandbox(sandbox_id)), self)

    async def stop(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(await self._transport.send(routes.stop_sandbox(sandbox_id)), self)

    async def delete(self, sandbox_id: str) -> None:
        await self._transport.send(routes.delete_sandbox(sandbox_id))

    async def exec(
        self,
        sandbox_id: str,
        command: str | builtins.list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        call = routes.exec_command(
            sandbox_id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        )
        return await self._transport.send(call)

    def exec_stream(
        self,
        sandbox_id: str,
        command: str | builtins.list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[ExecEvent]:
        """Use with `async for` (no await); the request is sent on the first iteration."""
        call = routes.exec_command(
            sandbox_id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, stream=True
        )
        return self._transport.events(call)

    async def write_file(self, sandbox_id: str, path: str, data: bytes | str) -> FileWritten:
        return await self._transport.send(routes.write_file(sandbox_id, path, data))

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        return await self._transport.send(routes.read_file(sandbox_id, path))

    async def list_files(self, sandbox_id: str, path: str = "") -> FileList:
        return await self._transport.send(routes.list_files(sandbox_id, path))

    async def delete_file(self, sandbox_id: str, path: str, recursive: bool = False) -> None:
        await self._transport.send(routes.delete_file(sandbox_id, path, recursive))


class AsyncSandbox:
    """One sandbox of `AsyncCave`; `async with` deletes it on exit."""

    def __init__(self, info: SandboxInfo, sandboxes: AsyncSandboxes) -> None:
        self.info = info
        self.api_key = info.api_key
        self._sandboxes = sandboxes

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> SandboxState:
        return self.info.state

    async def refresh(self) -> AsyncSandbox:
        self.info = (await self._sandboxes.get(self.id)).info
        return self

    async def start(self) -> AsyncSandbox:
        self.info = (await self._sandboxes.start(self.id)).info
        return self

    async def stop(self) -> AsyncSandbox:
        self.info = (await self._sandboxes.stop(self.id)).info
        return self

    async def delete(self) -> None:
        await self._sandboxes.delete(self.id)

    async def exec(
        self,
        command: str | list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> ExecResult:
        return await self._sandboxes.exec(
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
    ) -> AsyncIterator[ExecEvent]:
        return self._sandboxes.exec_stream(
            self.id, command, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s
        )

    async def write_file(self, path: str, data: bytes | str) -> FileWritten:
        return await self._sandboxes.write_file(self.id, path, data)

    async def read_file(self, path: str) -> bytes:
        return await self._sandboxes.read_file(self.id, path)

    async def list_files(self, path: str = "") -> FileList:
        return await self._sandboxes.list_files(self.id, path)

    async def delete_file(self, path: str, recursive: bool = False) -> None:
        await self._sandboxes.delete_file(self.id, path, recursive)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.delete()

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, name={self.info.name!r}, state={self.state!r})"


class AsyncKeys:
    """`client.keys` of `AsyncCave`."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._transport = transport

    async def create(
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
        return await self._transport.send(call)

    async def list(self, namespace: str | None = None) -> builtins.list[ApiKey]:
        return await self._transport.send(routes.list_keys(namespace))

    async def revoke(self, key_id: str) -> None:
        await self._transport.send(routes.revoke_key(key_id))

    async def rotate(self, key_id: str, grace_s: float | None = None) -> CreatedApiKey:
        return await self._transport.send(routes.rotate_key(key_id, grace_s))
