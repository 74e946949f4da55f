"""Workspace files from the host side: the zygote opens them safely, the host moves the bytes."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import Any

from actors.isolation.channel import Channel
from actors.isolation.results import FileEntry
from cave.errors import (
    CaveError,
    InvalidArgumentError,
    InvalidPathError,
    NotFoundError,
    QuotaExceededError,
)

MAX_READ_BYTES = 64 << 20


def _error(reply: dict[str, Any], path: str) -> CaveError:
    if reply.get("kind") == "invalid_path":
        return InvalidPathError(f"{path!r}: {reply['error']}")
    code = reply.get("errno")
    if code == errno.ENOENT:
        return NotFoundError(f"{path!r}: no such file or directory")
    if code == errno.ENOSPC:
        return QuotaExceededError(f"{path!r}: the sandbox's disk quota is full")
    return InvalidArgumentError(f"{path!r}: {reply['error']}")


class FileOps:
    def __init__(self, channel: Callable[[], Channel]) -> None:
        self._channel = channel

    async def _call(self, op: str, path: str, **extra: Any) -> tuple[dict[str, Any], list[int]]:
        reply, fds = await self._channel().request({"op": op, "path": path, **extra})
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise _error(reply, path)
        return reply, fds

    async def read(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        _, fds = await self._call("open_read", path)
        return await asyncio.to_thread(_read_fd, fds[0], path, max_bytes)

    async def write(self, path: str, data: bytes) -> int:
        _, fds = await self._call("open_write", path)
        await asyncio.to_thread(_write_fd, fds[0], path, data)
        return len(data)

    async def list(self, path: str = "") -> list[FileEntry]:
        reply, _ = await self._call("list", path)
        return [FileEntry(**entry) for entry in reply["entries"]]

    async def delete(self, path: str, recursive: bool = False) -> None:
        await self._call("delete", path, recursive=recursive)


def _read_fd(fd: int, path: str, max_bytes: int) -> bytes:
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise _error({"errno": exc.errno, "error": exc.strerror}, path) from None
    if len(data) > max_bytes:
        raise InvalidArgumentError(f"{path!r} is larger than {max_bytes} bytes")
    return data


def _write_fd(fd: int, path: str, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise _error({"errno": exc.errno, "error": exc.strerror}, path) from None
