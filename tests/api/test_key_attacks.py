"""Attacks on the key routes over HTTP, on SQLite and on PostgreSQL: a key acts only on keys whose
scopes it holds, hands out nothing that outlives it, revokes successors, keeps the last admin."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cave.auth import webhooks
from tests.api.keys_app import WEBHOOK_SECRET, KeysApi, auth, keys_api, keys_env
from tests.db.conftest import Target, anyio_backend, backend, pg_database, target  # noqa: F401

pytestmark = pytest.mark.anyio
KEYS = "/api/v1/auth/keys"
RECEIVER = f"{KEYS}/rotated"


@pytest.fixture
async def api(target: Target, tmp_path: Path) -> AsyncIterator[KeysApi]:  # noqa: F811
    async with keys_api(keys_env(target.env, tmp_path)) as server:
        yield server


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["code"])


async def _create(api: KeysApi, by: str, **body: Any) -> dict[str, Any]:
    response = await api.client.post(KEYS, json=body, headers=auth(by))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _listed(api: KeysApi, key_id: str) -> dict[str, Any]:
    listed = await api.client.get(KEYS, headers=auth(api.admin_key))
    found: dict[str, Any] = next(k for k in listed.json()["items"] if k["id"] == key_id)
    return found


async def test_keys_write_alone_cannot_take_over_a_stronger_key(api: KeysApi) -> None:
    admin = api.admin_key
    attacker = await _create(api, admin, namespace="ns-a", scopes=["keys:write"])
    victim = await _create(api, admin, namespace="ns-a", scopes=["sandboxes:write"])
    headers = auth(attacker["key"])
    rotated = await api.client.post(f"{KEYS}/{victim['id']}/rotate", json={}, headers=headers)
    assert (rotated.status_code, error_code(rotated)) == (403, "forbidden"), rotated.text
    assert "key" not in rotated.json()  # no successor handed out
    revoked = await api.client.delete(f"{KEYS}/{victim['id']}", headers=headers)
    assert (revoked.status_code, error_code(revoked)) == (403, "forbidden")
    granted = await api.client.post(KEYS, json={"scopes": ["sandboxes:write"]}, headers=headers)
    assert (granted.status_code, error_code(granted)) == (403, "forbidden")
    after = await _listed(api, victim["id"])
    assert (after["revoked_at"], after["grace_until"]) == (None, None)  # nothing changed
    listed = await api.client.get(KEYS, headers=auth(admin))
    assert not [k for k in listed.json()["items"] if k["rotated_from_id"] == victim["id"]]
    # On itself the same key may act: it holds every scope of itself.
    own = await api.client.post(f"{KEYS}/{attacker['id']}/rotate", json={}, headers=headers)
    assert own.status_code == 201, own.text
    assert own.json()["scopes"] == ["keys:write"]


async def test_a_child_key_expires_no_later_than_its_parent(api: KeysApi) -> None:
    parent = await _create(
        api, api.admin_key, namespace="ns-a", scopes=["keys:write", "sandboxes:read"], ttl_s=3600
    )
    unasked = await _create(api, parent["key"], scopes=["sandboxes:read"])
    longer = await _create(api, parent["key"], scopes=["sandboxes:read"], ttl_s=30 * 86400)
    shorter = await _create(api, parent["key"], scopes=["sandboxes:read"], ttl_s=60)
    assert unasked["expires_at"] == longer["expires_at"] == parent["expires_at"]
    assert shorter["expires_at"] < parent["expires_at"]
    forever = await _create(api, api.admin_key, namespace="ns-a", scopes=["sandboxes:read"])
    assert forever["expires_at"] is None  # the admin key has no expiry: nothing to cap at


async def test_revoking_a_key_revokes_its_successors(api: KeysApi) -> None:
    admin = auth(api.admin_key)
    first = await _create(api, api.admin_key, namespace="ns-a", scopes=["keys:read"])
    second = (await api.client.post(f"{KEYS}/{first['id']}/rotate", json={}, headers=admin)).json()
    third = (await api.client.post(f"{KEYS}/{second['id']}/rotate", json={}, headers=admin)).json()
    assert (await api.client.get(KEYS, headers=auth(third["key"]))).status_code == 200
    assert (await api.client.delete(f"{KEYS}/{first['id']}", headers=admin)).status_code == 204
    for key in (first, second, third):
        refused = await api.client.get(KEYS, headers=auth(key["key"]))
        assert (refused.status_code, error_code(refused)) == (401, "unauthorized")
        assert (await _listed(api, key["id"]))["revoked_at"] is not None


async def test_the_last_admin_key_cannot_be_revoked(api: KeysApi) -> None:
    me = (await api.client.get(KEYS, headers=auth(api.admin_key))).json()["items"]
    [bootstrap] = [k for k in me if k["kind"] == "admin"]
    path = f"{KEYS}/{bootstrap['id']}"
    refused = await api.client.delete(path, headers=auth(api.admin_key))
    assert (refused.status_code, error_code(refused)) == (409, "conflict"), refused.text
    assert "last active admin key" in refused.json()["error"]["message"]
    assert (await api.client.get(KEYS, headers=auth(api.admin_key))).status_code == 200
    second = await _create(api, api.admin_key, kind="admin")
    assert (await api.client.delete(path, headers=auth(second["key"]))).status_code == 204
    last = await api.client.delete(f"{KEYS}/{second['id']}", headers=auth(second["key"]))
    assert (last.status_code, error_code(last)) == (409, "conflict")


def _signed(body: bytes, event_id: str) -> dict[str, str]:
    headers = webhooks.sign(body, WEBHOOK_SECRET.encode(), event_id)
    return {"Content-Type": "application/json", **headers}


async def test_a_replay_to_another_replica_is_a_duplicate(
    api: KeysApi,
    target: Target,  # noqa: F811
    tmp_path: Path,
) -> None:
    body = json.dumps({"type": "key.rotated", "key_id": "nokey"}).encode()
    headers = _signed(body, f"ev-{time.time_ns()}")
    first = await api.client.post(RECEIVER, content=body, headers=headers)
    assert (first.status_code, first.json()["duplicate"]) == (200, False), first.text
    async with keys_api(keys_env(target.env, tmp_path), admin=False) as replica:
        again = await replica.client.post(RECEIVER, content=body, headers=headers)
    assert (again.status_code, again.json()["duplicate"]) == (200, True), again.text


async def test_without_a_secret_there_is_no_receiver(target: Target, tmp_path: Path) -> None:  # noqa: F811
    body = json.dumps({"type": "key.rotated", "key_id": "nokey"}).encode()
    env = keys_env(target.env, tmp_path, webhook_secret=False)
    async with keys_api(env, admin=False) as api:
        response = await api.client.post(RECEIVER, content=body, headers=_signed(body, "ev-1"))
    assert (response.status_code, error_code(response)) == (404, "not_found"), response.text
