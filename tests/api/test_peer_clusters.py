"""Peer routing between two separate Ray clusters, each with its own Serve app and database.

Cluster B is a second local Ray cluster (its own `ray start` process tree, ports, auth token and
ingress), serving the tiny model under issuer "cave-b". The front is an app "front2" in the
session's cluster (issuer "cave-front2", no models) whose peers are first a dead one, then B.
A key approved on the front chats through it: the dead peer fails, B answers.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.local import stop_local_cluster
from tests.api.conftest import TINY_MODEL, ApiServer, api_env
from tests.api.peer_cluster import start_other_cluster
from tests.api.test_peers import Cluster, chat, chat_events, closed_port, issue, sse_events, start
from tests.support import poll_until

FRONT = "cave-front2"


def peer(name: str, url: str, issuer: str, models: list[str]) -> str:
    listed = ", ".join(f'"{m}"' for m in models)
    return f'[[peers]]\nname = "{name}"\nurl = "{url}"\nissuer = "{issuer}"\nmodels = [{listed}]\n'


@pytest.fixture(scope="module")
def front_and_b(
    api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str]]:
    """(the front app in the session's cluster, cluster B's URL)."""
    from ray import serve

    root = tmp_path_factory.mktemp("peer-clusters")
    tiny = Path(api_server.env["BKG_DB_PATH"]).parent / "tiny"  # built by api_server
    front_url = f"{api_server.url}/front2"
    b_root, b_state = root / "b", Path(f"/run/cave-peer-b-{os.getpid()}")
    (root / "b.toml").write_text(
        peer("front", front_url, FRONT, []) + peer("a", api_server.url, "cave", [])
    )
    b_env = {
        **api_env(b_root, b_state),
        "CAVE_POOL_SIZE": "0",  # B serves a model, no sandboxes
        "CAVE_LLM_ISSUER": "cave-b",
        "CAVE_PEERS_FILE": str(root / "b.toml"),
    }
    tiny_spec = {"model_id": TINY_MODEL, "engine": "cpu", "source": str(tiny)}
    try:
        b = start_other_cluster(root / "ray-b", {"env": b_env, "models": [tiny_spec]})
        # No probe during the test: the dead peer is found dead by the request that tries it.
        (root / "front.toml").write_text(
            "probe_interval_s = 3600\ncooldown_s = 3600\n"
            + peer("dead", f"http://127.0.0.1:{closed_port()}", "cave-dead", [TINY_MODEL])
            + peer("b", b.url, "cave-b", [TINY_MODEL])
        )
        front_env = {"CAVE_LLM_ISSUER": FRONT, "CAVE_PEERS_FILE": str(root / "front.toml")}
        front = start(FRONT, "/front2", api_server, root / "front", front_env, [])
        with httpx.Client(base_url=b.url, timeout=60) as client:
            poll_until(lambda: client.get("/readyz").status_code == 200, 120, "B ready")
        yield front, b.url
    finally:
        serve.delete(FRONT)
        stop_local_cluster(root / "ray-b")
        shutil.rmtree(b_state, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_a_front_key_fails_over_to_the_other_ray_cluster(
    front_and_b: tuple[Cluster, str],
) -> None:
    front, b_url = front_and_b
    key = issue(front)
    token = key["model_access_key"]
    # B trusts the front's keys through the front's JWKS, fetched over HTTP across clusters.
    poll_until(lambda: chat(b_url, token).status_code == 200, 60, "B accepts the front's key")

    answer = chat(front.url, token, stream=True)
    assert answer.status_code == 200, answer.text
    events = sse_events(answer)
    assert not [e for e in events if "error" in e], events
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 0

    def usage_rows() -> list[tuple[str, int]]:
        with sqlite3.connect(front.env["BKG_DB_PATH"]) as db:
            return db.execute(
                "SELECT served_by, completion_tokens FROM usage_events WHERE token_id = ?",
                (key["token_id"],),
            ).fetchall()

    rows = poll_until(usage_rows, 20, "the front's usage event")
    assert rows == [("peer:b", usage["completion_tokens"])]
    audited = poll_until(lambda: chat_events(front, key["token_id"]), 20, "the audit event")
    failures = audited[0]["details"]["peer_failures"]
    assert len(failures) == 1 and failures[0].startswith("dead: ConnectError"), failures
