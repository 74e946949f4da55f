"""Rotation webhooks through a real HTTP receiver: signed, retried while it is down, once each."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import select

from cave.auth import webhooks
from cave.auth.keys import KeyService
from cave.auth.outbox import OutboxDispatcher
from cave.auth.settings import AuthSettings
from cave.db import Database, OutboxRow

pytestmark = pytest.mark.anyio
SECRET = b"hook-secret"


class Receiver:
    """A webhook receiver as a customer would write one with our verification helper."""

    def __init__(self, port: int) -> None:
        self.port, self.accepted, self.refused = port, Counter[str](), 0
        self.seen: set[str] = set()  # a customer's own store of the ids handled
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    verified = webhooks.verify(dict(self.headers), body, SECRET)
                except webhooks.WebhookSignatureError:
                    receiver.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                with receiver._lock:
                    if verified.event_id not in receiver.seen:
                        receiver.seen.add(verified.event_id)
                        receiver.accepted[verified.event_id] += 1
                self.send_response(204)  # a replay is acknowledged, not processed again
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(_free_port())
    yield server
    server.stop()


@pytest.fixture
async def rotated(db: Database, auth_settings: AuthSettings) -> str:
    keys = KeyService(db, auth_settings)
    old, _ = await keys.create("admin", None, [])
    await keys.rotate(old.id)
    return old.id


async def _outbox(db: Database) -> list[OutboxRow]:
    async with db.admin_session() as session:
        return list((await session.scalars(select(OutboxRow))).all())


async def test_receiver_down_then_up_gets_the_event_exactly_once(
    db: Database, rotated: str, receiver: Receiver
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        dispatcher = OutboxDispatcher(db, f"http://127.0.0.1:{receiver.port}/hook", SECRET, client)
        assert await dispatcher.run_once() == 0  # nobody listens yet
        [row] = await _outbox(db)
        assert row.attempts == 1 and row.delivered_at is None and row.last_error
        receiver.start()
        deadline = time.monotonic() + 30
        while not (await _outbox(db))[0].delivered_at:  # the retry waits out its backoff
            assert time.monotonic() < deadline, "the event was never delivered"
            await dispatcher.run_once()
            await asyncio.sleep(0.1)
        assert await dispatcher.run_once() == 0
    assert list(receiver.accepted.values()) == [1]
    [row] = await _outbox(db)
    assert row.payload["key_id"] == rotated and row.event_id in receiver.accepted


async def test_two_dispatchers_at_once_deliver_once(
    db: Database, rotated: str, receiver: Receiver
) -> None:
    receiver.start()
    async with httpx.AsyncClient(timeout=5) as client:
        url = f"http://127.0.0.1:{receiver.port}/hook"
        first, second = (OutboxDispatcher(db, url, SECRET, client) for _ in range(2))
        delivered = await asyncio.gather(first.run_once(), second.run_once())
    assert sum(delivered) == 1 and list(receiver.accepted.values()) == [1]


async def test_a_wrong_secret_is_refused_and_retried(
    db: Database, rotated: str, receiver: Receiver
) -> None:
    receiver.start()
    async with httpx.AsyncClient(timeout=5) as client:
        dispatcher = OutboxDispatcher(db, f"http://127.0.0.1:{receiver.port}/", b"wrong", client)
        assert await dispatcher.run_once() == 0
    [row] = await _outbox(db)
    assert row.last_error == "HTTP 401" and receiver.refused == 1 and not receiver.accepted
