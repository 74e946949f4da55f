"""Host-to-zygote framing: one JSON message per SEQPACKET datagram, file descriptors alongside."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

# A datagram carries one whole request; argv, env and a shell script must fit. Raised above the
# kernel's default buffer so that a 1 MiB script still goes in one message.
MAX_MESSAGE_BYTES = 1 << 20
MAX_FDS = 8

Message = dict[str, Any]


def socket_pair() -> tuple[socket.socket, socket.socket]:
    host, sandbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (host, sandbox):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE_BYTES + 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE_BYTES + 65536)
    return host, sandbox


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class MessageTooLargeError(ValueError):
    """The message would not fit one datagram of the size the zygote reads."""


def send(sock: socket.socket, message: Message, fds: list[int] | None = None) -> None:
    data = encode(message)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(f"{len(data)} bytes, at most {MAX_MESSAGE_BYTES} fit")
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Blocking receive; (None, []) when the peer has gone."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_FDS)
    if not data:
        for fd in fds:
            _close(fd)
        return None, []
    if flags & socket.MSG_TRUNC:
        for fd in fds:
            _close(fd)
        raise ValueError(f"a control message exceeded {MAX_MESSAGE_BYTES} bytes")
    return json.loads(data), fds


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
