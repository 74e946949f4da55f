"""Signed webhooks: HMAC-SHA256 over `timestamp.body`, with stale-timestamp and replay checks."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from cave.errors import AuthError

SIGNATURE_HEADER = "X-Cave-Signature"
EVENT_ID_HEADER = "X-Cave-Event-Id"
TOLERANCE_S = 300


class WebhookSignatureError(AuthError):
    """The webhook is not authentic, too old, or a replay; the message says which."""

    code = "bad_webhook_signature"


class WebhookReplayError(WebhookSignatureError):
    """An authentic event delivered again: receivers answer 2xx, having handled it already."""

    code = "webhook_replay"


def sign(body: bytes, secret: bytes, event_id: str, now: float | None = None) -> dict[str, str]:
    """Headers to send with `body`: `t=<unix seconds>,v1=<hex mac>` and the event id."""
    timestamp = int(time.time() if now is None else now)
    return {
        SIGNATURE_HEADER: f"t={timestamp},v1={_mac(secret, timestamp, body)}",
        EVENT_ID_HEADER: event_id,
    }


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


class ReplayGuard:
    """Event ids seen within the tolerance window; bounded, thread-safe, in memory."""

    def __init__(self, window_s: float = TOLERANCE_S, max_ids: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._window_s, self._max_ids = window_s, max_ids
        self._lock = threading.Lock()

    def first_time(self, event_id: str, now: float) -> bool:
        with self._lock:
            while self._seen and (
                len(self._seen) >= self._max_ids
                or next(iter(self._seen.values())) < now - self._window_s
            ):
                self._seen.popitem(last=False)
            if event_id in self._seen:
                return False
            self._seen[event_id] = now
            return True


@dataclass(frozen=True)
class Verified:
    event_id: str
    timestamp: int


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: bytes,
    guard: ReplayGuard,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> Verified:
    """Check signature, age and uniqueness, in that order; raise WebhookSignatureError."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp, macs = _parse(lower.get(SIGNATURE_HEADER.lower(), ""))
    event_id = lower.get(EVENT_ID_HEADER.lower(), "")
    if not event_id:
        raise WebhookSignatureError(f"missing {EVENT_ID_HEADER} header")
    expected = _mac(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, mac) for mac in macs):
        raise WebhookSignatureError("signature does not match")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookSignatureError(f"timestamp is more than {tolerance_s:.0f} s from now")
    if not guard.first_time(event_id, current):
        raise WebhookReplayError(f"event {event_id} was already delivered")
    return Verified(event_id, timestamp)


def _parse(header: str) -> tuple[int, list[str]]:
    parts = [p.strip().split("=", 1) for p in header.split(",") if "=" in p]
    timestamps = [v for k, v in parts if k == "t"]
    macs = [v for k, v in parts if k == "v1"]  # several during a secret rotation
    if len(timestamps) != 1 or not timestamps[0].isdigit() or not macs:
        raise WebhookSignatureError(f"malformed {SIGNATURE_HEADER} header")
    return int(timestamps[0]), macs
