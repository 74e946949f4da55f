"""Many requests at once over real HTTP: concurrent execs stay apart, concurrent stops agree."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import ApiServer

SANDBOXES = 10
EXECS = 50


def async_client(api_server: ApiServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=api_server.url,
        headers={"Authorization": f"Bearer {api_server.admin_key}"},
        timeout=120.0,
        limits=httpx.Limits(max_connections=EXECS),
    )


async def create_many(api_server: ApiServer, count: int) -> list[str]:
    async with async_client(api_server) as client:
        responses = await asyncio.gather(
            *(client.post("/api/v1/sandboxes", json={"name": f"conc-{i}"}) for i in range(count))
        )
    assert [r.status_code for r in responses] == [201] * count, [r.text for r in responses]
    return [str(r.json()["id"]) for r in responses]


@pytest.fixture(scope="module")
def sandbox_ids(api_server: ApiServer) -> Iterator[list[str]]:
    ids = asyncio.run(create_many(api_server, SANDBOXES))
    yield ids
    with api_server.client() as client:
        for sid in ids:
            client.delete(f"/api/v1/sandboxes/{sid}")


def test_concurrent_execs_across_sandboxes(api_server: ApiServer, sandbox_ids: list[str]) -> None:
    async def run_all() -> list[tuple[str, int, httpx.Response]]:
        async with async_client(api_server) as client:

            async def one(n: int) -> tuple[str, int, httpx.Response]:
                sid = sandbox_ids[n % len(sandbox_ids)]
                # Each exec leaves a file and prints what only it can know: crossed wires show.
                command = f"echo {n} > out-{n}; cat out-{n}; echo $N >&2"
                response = await client.post(
                    f"/api/v1/sandboxes/{sid}/exec", json={"command": command, "env": {"N": sid}}
                )
                return sid, n, response

            return await asyncio.gather(*(one(n) for n in range(EXECS)))

    results = asyncio.run(run_all())
    for sid, n, response in results:
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["exit_code"], body["stdout"], body["stderr"]) == (0, f"{n}\n", f"{sid}\n")
    assert len({r.json()["execution_id"] for _, _, r in results}) == EXECS
    with api_server.client() as client:
        for index, sid in enumerate(sandbox_ids):
            listed = client.get(f"/api/v1/sandboxes/{sid}/files").json()["entries"]
            mine = {f"out-{n}" for n in range(index, EXECS, len(sandbox_ids))}
            assert {entry["name"] for entry in listed} == mine  # no file in the wrong sandbox


def stop_events(api_server: ApiServer, sandbox_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(api_server.env["BKG_DB_PATH"]) as db:
        rows = db.execute(
            "SELECT action, outcome FROM audit_events WHERE target = ? AND action = ?",
            (sandbox_id, "sandbox.stop"),
        ).fetchall()
    return [(str(action), str(outcome)) for action, outcome in rows]


def test_concurrent_stops_of_one_sandbox(api_server: ApiServer, sandbox_ids: list[str]) -> None:
    target = sandbox_ids[0]

    async def stop_all() -> list[httpx.Response]:
        async with async_client(api_server) as client:
            return await asyncio.gather(
                *(client.post(f"/api/v1/sandboxes/{target}/stop") for _ in range(5))
            )

    responses = asyncio.run(stop_all())
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert [r.json()["state"] for r in responses] == ["stopped"] * 5
    assert stop_events(api_server, target) == [("sandbox.stop", "ok")]
    with api_server.client() as client:
        assert client.get(f"/api/v1/sandboxes/{target}").json()["state"] == "stopped"
        again = client.post(f"/api/v1/sandboxes/{target}/stop")
        assert (again.status_code, again.json()["state"]) == (200, "stopped")
    assert len(stop_events(api_server, target)) == 1  # stopping a stopped sandbox is no event


def test_concurrent_deletes_of_one_sandbox(api_server: ApiServer) -> None:
    with api_server.client() as client:
        target = client.post("/api/v1/sandboxes", json={"name": "deleted-five-times"}).json()["id"]

    async def delete_all() -> list[httpx.Response]:
        async with async_client(api_server) as client:
            return await asyncio.gather(
                *(client.delete(f"/api/v1/sandboxes/{target}") for _ in range(5))
            )

    statuses = [r.status_code for r in asyncio.run(delete_all())]
    # The first delete wins; the others find it being deleted (204) or already gone (404).
    assert 204 in statuses and set(statuses) <= {204, 404}, statuses
    with sqlite3.connect(api_server.env["BKG_DB_PATH"]) as db:
        deletes = db.execute(
            "SELECT count(*) FROM audit_events WHERE target = ? AND action = 'sandbox.delete'",
            (target,),
        ).fetchone()[0]
    assert deletes == 1
