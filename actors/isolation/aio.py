"""Awaiting raw file descriptors on the running asyncio loop (pipes, pidfds, the control socket)."""

from __future__ import annotations

import asyncio


async def wait_readable(fd: int) -> None:
    await _wait(fd, readable=True)


async def wait_writable(fd: int) -> None:
    await _wait(fd, readable=False)


async def _wait(fd: int, readable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = (
        (loop.add_reader, loop.remove_reader) if readable else (loop.add_writer, loop.remove_writer)
    )
    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)
