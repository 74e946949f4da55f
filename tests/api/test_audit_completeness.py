"""Audit completeness over real HTTP: an exec whose argv and environment are not UTF-8 runs, and
its record holds the argv losslessly (tests/db/test_exec_records.py: the same on PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from deployments.sandboxes.exec_records import command_of
from tests.api.conftest import ApiServer
from tests.api.test_records import query
from tests.support import poll_until

# A non-UTF-8 byte as Python and our JSON carry it (surrogateescape): "\udcff" is the byte 0xff.
ODD = "x\udcff"
ODD_ARGV = ["sh", "-c", 'printf "%s|%s" "$1" "$ODD"', "sh", ODD]


def test_a_lone_surrogate_over_http_is_stored_losslessly(api_server: ApiServer) -> None:
    """JSON carries the byte as a `\\udcff` escape; the record in the API's database keeps it."""
    body = json.dumps({"command": ODD_ARGV, "env": {"ODD": ODD}})
    with api_server.client() as client:
        sid = client.post("/api/v1/sandboxes", json={"name": "odd"}).json()["id"]
        ran = client.post(
            f"/api/v1/sandboxes/{sid}/exec",
            content=body.encode(),
            headers={"content-type": "application/json"},
        )
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204
    assert ran.status_code == 200, ran.text
    assert ran.json()["stdout"] == "x\ufffd|x\ufffd"
    sql = "SELECT command FROM executions WHERE id = ?"
    rows = poll_until(lambda: query(api_server, sql, ran.json()["execution_id"]), 30, "record")
    assert command_of(json.loads(rows[0][0])) == ODD_ARGV


# A lone high surrogate: no byte sequence decodes to it, so no command can receive it.
UNSPELLABLE = "a\ud800"


@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson"])
@pytest.mark.parametrize(
    "body",
    [
        {"command": ["echo", UNSPELLABLE]},
        {"command": f"echo {UNSPELLABLE}"},
        {"command": ["env"], "env": {"X": UNSPELLABLE}},
    ],
    ids=["argv", "shell", "env"],
)
def test_a_surrogate_no_byte_spells_is_a_422_before_any_stream_and_the_sandbox_goes_on(
    api_server: ApiServer, accept: str, body: dict[str, object]
) -> None:
    with api_server.client() as client:
        sid = client.post("/api/v1/sandboxes", json={"name": "unspellable"}).json()["id"]
        refused = client.post(
            f"/api/v1/sandboxes/{sid}/exec",
            content=json.dumps(body).encode(),  # the JSON escape \ud800, as a client sends it
            headers={"content-type": "application/json", "accept": accept},
        )
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "validation_error" and "lone surrogate" in error["message"]
        after = client.post(f"/api/v1/sandboxes/{sid}/exec", json={"command": ["echo", "fine"]})
        assert client.delete(f"/api/v1/sandboxes/{sid}").status_code == 204
    assert after.status_code == 200 and after.json()["stdout"] == "fine\n"
