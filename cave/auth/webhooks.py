"""Signed webhooks in the Standard Webhooks format; the ids received are kept in the database.

`webhook-signature: v1,<base64 HMAC-SHA256(secret, "<webhook-id>.<webhook-timestamp>.<body>")>`
(https://www.standardwebhooks.com): the event id and the time are signed with the body, so a
receiver may trust both. A secret written `whsec_<base64>` is that base64's bytes, as the
Standard Webhooks libraries read it; any other secret is its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete

from cave.db import Database, WebhookIdRow, utcnow
from cave.errors import AuthError, ConflictError

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
TOLERANCE_S = 300
MAX_ID_CHARS = 255  # the column's width
_SECRET_PREFIX = b"whsec_"


class WebhookSignatureError(AuthError):
    """The webhook is not authentic or too old; the message says which."""

    code = "bad_webhook_signature"


@dataclass(frozen=True)
class Verified:
    event_id: str
    timestamp: int


def sign(body: bytes, secret: bytes, event_id: str, now: float | None = None) -> dict[str, str]:
    """The three headers to send with `body`."""
    timestamp = int(time.time() if now is None else now)
    return {
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"v1,{_mac(secret, event_id, timestamp, body)}",
    }


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: bytes,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> Verified:
    """Check the signature, then the age; raise WebhookSignatureError. A replay of an
    authentic event verifies again: `first_delivery` tells it apart."""
    lower = {k.lower(): v for k, v in headers.items()}
    event_id = lower.get(ID_HEADER, "")
    raw_timestamp = lower.get(TIMESTAMP_HEADER, "")
    if not event_id or len(event_id) > MAX_ID_CHARS:
        raise WebhookSignatureError(f"missing or malformed {ID_HEADER} header")
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()) or len(raw_timestamp) > 12:
        raise WebhookSignatureError(f"missing or malformed {TIMESTAMP_HEADER} header")
    timestamp = int(raw_timestamp)
    expected = _mac(secret, event_id, timestamp, body)
    # Several signatures, space-separated, during a secret rotation; other versions are skipped.
    offered = [s[3:] for s in lower.get(SIGNATURE_HEADER, "").split() if s.startswith("v1,")]
    if not offered:
        raise WebhookSignatureError(f"missing or malformed {SIGNATURE_HEADER} header")
    if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in offered):
        raise WebhookSignatureError("signature does not match")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookSignatureError(f"timestamp is more than {tolerance_s:.0f} s from now")
    return Verified(event_id, timestamp)


async def first_delivery(
    db: Database, verified: Verified, tolerance_s: float = TOLERANCE_S
) -> bool:
    """Record the event id; False when any replica recorded it before (a replay). An id is
    kept while its timestamp would still verify, with as much again for clock skew; older ids
    are removed on the way."""
    kept_until = datetime.fromtimestamp(verified.timestamp + 2 * tolerance_s, UTC)
    try:
        async with db.admin_session() as session:
            expired = delete(WebhookIdRow).where(WebhookIdRow.seen_until < utcnow())
            await session.execute(expired.execution_options(synchronize_session=False))
            session.add(WebhookIdRow(event_id=verified.event_id, seen_until=kept_until))
    except ConflictError:  # the primary key: insert-or-conflict is the replay check
        return False
    return True


def _mac(secret: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    content = f"{event_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(_key(secret), content, hashlib.sha256).digest()).decode()


def _key(secret: bytes) -> bytes:
    if not secret.startswith(_SECRET_PREFIX):
        return secret
    try:
        return base64.b64decode(secret[len(_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return secret  # not base64 after all: the whole string is the secret
