"""A burst of creates far over a node's room: the excess is refused at once with 429 `capacity`,
the rest start, and nothing is half-created: no record without an actor, no actor without a
record (issue 13, "Bad input")."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import ray

from actors.handles import directory
from tests.api.conftest import ApiServer, redeploy
from tests.api.test_quotas import fresh_namespace

BURST = 24
ROOM = 4  # places left on the node for this test's burst


def _placed() -> set[str]:
    ids: list[str] = ray.get(directory().ids.remote())
    return set(ids)


@pytest.fixture
def small_node(api_server: ApiServer) -> Iterator[ApiServer]:
    """The API with the node's capacity fixed at what other tests hold now plus ROOM."""
    capacity = len(_placed()) + ROOM
    redeploy(api_server, {**api_server.env, "CAVE_MAX_SANDBOXES_PER_NODE": str(capacity)})
    try:
        yield api_server
    finally:
        redeploy(api_server, api_server.env)


async def _burst(api_server: ApiServer, namespace: str) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {api_server.admin_key}"}
    limits = httpx.Limits(max_connections=BURST)
    async with httpx.AsyncClient(
        base_url=api_server.url, headers=headers, timeout=120.0, limits=limits
    ) as client:
        body = {"namespace": namespace}
        return await asyncio.gather(
            *(client.post("/api/v1/sandboxes", json=body) for _ in range(BURST))
        )


def test_a_burst_over_capacity_starts_what_fits_and_refuses_the_rest_whole(
    small_node: ApiServer,
) -> None:
    namespace = fresh_namespace("burst")
    before = _placed()
    responses = asyncio.run(_burst(small_node, namespace))
    assert Counter(r.status_code for r in responses) == {201: ROOM, 429: BURST - ROOM}
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "capacity", refused.text
        assert "Retry-After" in refused.headers
    started = {r.json()["id"] for r in responses if r.status_code == 201}
    with small_node.client() as admin:
        page = admin.get("/api/v1/sandboxes", params={"namespace": namespace, "limit": 200})
        listed = {s["id"]: s["state"] for s in page.json()["items"]}
        assert listed == dict.fromkeys(started, "running")  # no record of a refused create
        assert _placed() - before == started  # no actor without a record
        for sandbox_id in started:
            assert admin.delete(f"/api/v1/sandboxes/{sandbox_id}").status_code == 204
    assert not _placed() & started
