"""Rotation webhooks through the running API: delivered, signed (Standard Webhooks), once."""

from __future__ import annotations

import json
import time

import httpx

from cave.auth import webhooks
from tests.api.conftest import ApiServer
from tests.api.test_records import query
from tests.support import poll_until

SECRET = b"test-webhook-secret"
RECEIVER = "/api/v1/auth/keys/rotated"


def test_a_rotation_reaches_the_receiver_once(api_server: ApiServer) -> None:
    with api_server.client() as client:
        created = client.post(
            "/api/v1/auth/keys", json={"namespace": "hooks", "scopes": ["sandboxes:read"]}
        ).json()
        assert client.post(f"/api/v1/auth/keys/{created['id']}/rotate", json={}).status_code == 201
    sql = "SELECT count(*) FROM audit_events WHERE action = 'key.rotation_received' AND target = ?"
    poll_until(lambda: query(api_server, sql, created["id"])[0][0] == 1, 30, "webhook delivered")
    delivered = "SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL AND payload LIKE ?"
    # The sender marks the event delivered once the receiver's answer is back: poll for it too.
    poll_until(
        lambda: query(api_server, delivered, f"%{created['id']}%")[0][0] == 1,
        30,
        "marked delivered",
    )
    assert query(api_server, sql, created["id"])[0][0] == 1  # received once, not again


def _signed(body: bytes, event_id: str, now: float | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", **webhooks.sign(body, SECRET, event_id, now)}


def test_the_receiver_refuses_forgeries_and_answers_replays(api_server: ApiServer) -> None:
    body = json.dumps({"type": "key.rotated", "key_id": "nokey", "event_id": "ev-1"}).encode()
    with httpx.Client(base_url=api_server.url, timeout=30) as client:
        first = client.post(RECEIVER, content=body, headers=_signed(body, "ev-replay-1"))
        assert first.status_code == 200 and first.json()["duplicate"] is False
        again = client.post(RECEIVER, content=body, headers=_signed(body, "ev-replay-1"))
        assert again.status_code == 200 and again.json()["duplicate"] is True
        # The replay guard is the database's: every replica sees the id.
        seen = "SELECT count(*) FROM webhook_ids WHERE event_id = ?"
        assert query(api_server, seen, "ev-replay-1")[0][0] == 1
        forged = _signed(body, "ev-forged") | {webhooks.SIGNATURE_HEADER: "v1,AAAA"}
        assert client.post(RECEIVER, content=body, headers=forged).status_code == 401
        # A replay under a fresh id does not pass the guard: the id is signed with the body.
        renamed = _signed(body, "ev-replay-1") | {webhooks.ID_HEADER: "ev-replay-2"}
        refused = client.post(RECEIVER, content=body, headers=renamed)
        assert (refused.status_code, refused.json()["error"]["code"]) == (
            401,
            "bad_webhook_signature",
        )
        stale = _signed(body, "ev-stale", now=time.time() - 3600)
        refused = client.post(RECEIVER, content=body, headers=stale)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "bad_webhook_signature"
