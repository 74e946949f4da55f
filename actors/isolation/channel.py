"""Host end of the control socket: asyncio requests to the zygote, replies matched by id."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable

from actors.isolation import protocol
from actors.isolation.aio import wait_writable
from cave.errors import InvalidArgumentError, SandboxError

Reply = tuple[protocol.Message, list[int]]


class Channel:
    """Concurrent requests over one SEQPACKET socket; every reply carries its request's id."""

    def __init__(self, sock: socket.socket, on_event: Callable[[protocol.Message], None]) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._on_event = on_event  # messages that answer no request (ready, spawned, ...)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    def next_id(self) -> int:
        return next(self._ids)

    def expect(self, request_id: int) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[request_id] = future
        return future

    def forget(self, request_id: int) -> None:
        """Drop the wait for a reply that will not come (its request was never sent)."""
        self._pending.pop(request_id, None)

    async def send(self, message: protocol.Message, fds: list[int] | None = None) -> None:
        if self.closed:
            raise SandboxError("the sandbox process has exited")
        while True:
            try:
                protocol.send(self._sock, message, fds)
                return
            except BlockingIOError:
                await wait_writable(self._sock.fileno())
            except protocol.MessageTooLargeError as exc:
                raise InvalidArgumentError(f"the request is too large: {exc}") from None
            except OSError as exc:
                raise SandboxError(f"the sandbox process is gone: {exc.strerror}") from None

    async def request(self, message: protocol.Message, fds: list[int] | None = None) -> Reply:
        request_id = self.next_id()
        future = self.expect(request_id)
        try:
            await self.send({**message, "id": request_id}, fds)
            return await future
        finally:
            self.forget(request_id)

    def _readable(self) -> None:
        while True:
            try:
                message, fds = protocol.recv(self._sock)
            except BlockingIOError:
                return
            except OSError:
                message, fds = None, []
            if message is None:
                self.close()
                return
            future = self._pending.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result((message, fds))
            else:
                for fd in fds:
                    os.close(fd)
                self._on_event(message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SandboxError("the sandbox process has exited"))
                future.exception()  # whoever awaits still gets it; nobody awaiting is no error
        self._pending.clear()
        self._on_event({"op": "closed"})
