"""Peer clusters: a front gateway without models forwards to a peer, failing over from a dead one.

Two more Serve apps run beside the session's API ("cave", issuer "cave"), each with its own
database and issuer, as two more clusters would:
- "b" under /peer-b (issuer "cave-b") serves the tiny model and trusts the keys of "c" and of the
  session API, through their JWKS;
- "c" under /front (issuer "cave-c") serves no model; its peers are first a dead one (a closed
  port), then "b".
They share the session's Ray cluster and HTTP proxy; what crosses between them is HTTP only, as
between two clusters (keys, JWKS, forwarded chats), so a second Ray cluster would add start-up
time and memory, not coverage.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cave.errors import ConfigError, InferenceUnavailableError
from inference.peers import Peer, PeerHealth, PeerRouter, load_peers
from inference.tokens import PeerKeys
from tests.api.conftest import TINY_MODEL, ApiServer, api_env
from tests.support import poll_until

NAMESPACE = "peer-team"
FRONT, PEER_B = "cave-front", "cave-peer-b"


@dataclass(frozen=True)
class Cluster:
    url: str
    admin_key: str
    env: dict[str, str]


def closed_port() -> int:
    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(
    name: str, prefix: str, api_server: ApiServer, root: Path, env: dict[str, str], models: list
) -> Cluster:
    from ray import serve

    from cave.auth.bootstrap import create_admin_key
    from deployments.http.app import build_app

    state_dir = Path(api_server.env["CAVE_STATE_DIR"])
    env = {**api_env(root, state_dir), "CAVE_POOL_SIZE": "0", **env}
    admin_key = asyncio.run(create_admin_key(env))
    serve.run(build_app({"env": env, "models": models}), name=name, route_prefix=prefix)
    url = f"{api_server.url}{prefix}"
    with httpx.Client(base_url=url, timeout=60) as client:
        poll_until(lambda: client.get("/readyz").status_code == 200, 120, f"{name} ready")
    return Cluster(url, admin_key, env)


@pytest.fixture(scope="module")
def clusters(
    api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Cluster]]:
    """(front "c", peer "b"); c starts first, so b finds c's JWKS when it starts."""
    from ray import serve

    root = tmp_path_factory.mktemp("peers")
    tiny = Path(api_server.env["BKG_DB_PATH"]).parent / "tiny"  # built by api_server
    front_url, b_url = f"{api_server.url}/front", f"{api_server.url}/peer-b"
    # No probe during the test: the dead peer is found dead by the first request that tries
    # it, and then skipped for the rest of the module.
    (root / "c.toml").write_text(
        "probe_interval_s = 3600\ncooldown_s = 3600\n"
        f'[[peers]]\nname = "dead"\nurl = "http://127.0.0.1:{closed_port()}"\n'
        f'issuer = "cave-dead"\nmodels = ["{TINY_MODEL}"]\n'
        f'[[peers]]\nname = "b"\nurl = "{b_url}"\nissuer = "cave-b"\nmodels = ["{TINY_MODEL}"]\n'
    )
    (root / "b.toml").write_text(
        f'[[peers]]\nname = "c"\nurl = "{front_url}"\nissuer = "cave-c"\nmodels = []\n'
        f'[[peers]]\nname = "a"\nurl = "{api_server.url}"\nissuer = "cave"\nmodels = []\n'
    )
    c_env = {"CAVE_LLM_ISSUER": "cave-c", "CAVE_PEERS_FILE": str(root / "c.toml")}
    b_env = {"CAVE_LLM_ISSUER": "cave-b", "CAVE_PEERS_FILE": str(root / "b.toml")}
    tiny_spec = {"model_id": TINY_MODEL, "engine": "cpu", "source": str(tiny)}
    try:
        c = start(FRONT, "/front", api_server, root / "c", c_env, [])
        b = start(PEER_B, "/peer-b", api_server, root / "b", b_env, [tiny_spec])
        yield c, b
    finally:
        for app in (FRONT, PEER_B):
            serve.delete(app)


def issue(cluster: Cluster, model: str = TINY_MODEL) -> dict:
    """A model-access key for `model`, requested and approved on `cluster`."""
    admin = {"Authorization": f"Bearer {cluster.admin_key}"}
    with httpx.Client(base_url=cluster.url, timeout=60, headers=admin) as client:
        made = client.post(
            "/api/v1/auth/keys", json={"namespace": NAMESPACE, "scopes": ["llm:request"]}
        )
        assert made.status_code == 201, made.text
        asked = client.post(
            "/api/v1/llm/requests",
            json={"model_id": model, "cave_namespace": NAMESPACE},
            headers={"Authorization": f"Bearer {made.json()['key']}"},
        )
        assert asked.status_code == 201, asked.text
        approved = client.post(f"/api/v1/admin/llm/requests/{asked.json()['id']}/approve")
    assert approved.status_code == 200, approved.text
    return dict(approved.json())


def chat(url: str, key: str, stream: bool = False, model: str = TINY_MODEL) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}", "X-Cave-Namespace": NAMESPACE}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=120)


def sse_events(response: httpx.Response) -> list[dict]:
    lines = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]", lines
    return [json.loads(line) for line in lines[:-1]]


def chat_events(cluster: Cluster, token_id: str) -> list[dict]:
    log = Path(cluster.env["CAVE_AUDIT_LOG_PATH"])
    events = []
    for path in sorted(log.parent.glob(f"{log.stem}.*{log.suffix}")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("actor") == f"model-key:{token_id}" and event["action"] == "llm.chat":
                events.append(event)
    return events


def test_a_front_key_streams_through_the_peer_after_the_dead_one(
    clusters: tuple[Cluster, Cluster],
) -> None:
    c, b = clusters
    key = issue(c)
    token = key["model_access_key"]
    # b trusts c's key through c's JWKS (fetched in the background at b's start).
    poll_until(lambda: chat(b.url, token).status_code == 200, 60, "b accepts c's key")

    answer = chat(c.url, token, stream=True)
    assert answer.status_code == 200, answer.text
    events = sse_events(answer)
    assert not [e for e in events if "error" in e], events
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert events[-1]["usage"]["completion_tokens"] >= 1
    assert events[-1]["usage"]["prompt_tokens"] > 0

    def usage_rows() -> list[tuple[str, int]]:
        with sqlite3.connect(c.env["BKG_DB_PATH"]) as db:
            return db.execute(
                "SELECT served_by, completion_tokens FROM usage_events WHERE token_id = ?",
                (key["token_id"],),
            ).fetchall()

    rows = poll_until(usage_rows, 20, "c's usage event")
    assert rows == [("peer:b", events[-1]["usage"]["completion_tokens"])]
    audited = poll_until(lambda: chat_events(c, key["token_id"]), 20, "c's audit event")
    failures = audited[0]["details"]["peer_failures"]
    assert len(failures) == 1 and failures[0].startswith("dead: ConnectError"), failures


def test_the_dead_peer_is_skipped_while_it_cools_down(clusters: tuple[Cluster, Cluster]) -> None:
    c, b = clusters
    key = issue(c)
    poll_until(lambda: chat(b.url, key["model_access_key"]).status_code == 200, 60, "b trusts c")
    chat(c.url, key["model_access_key"])  # the dead peer is tried, unless already cooling down
    done = chat(c.url, key["model_access_key"])  # now it is: straight to b
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] >= 1

    def both() -> list[dict]:
        found = chat_events(c, key["token_id"])
        return found if len(found) == 2 else []

    audited = poll_until(both, 20, "c's two audit events")
    assert all(e["details"]["served_by"] == "peer:b" for e in audited)
    assert "peer_failures" not in audited[1]["details"]


def test_the_front_lists_its_peers_models(clusters: tuple[Cluster, Cluster]) -> None:
    c, _ = clusters
    models = httpx.get(f"{c.url}/v1/models", timeout=60)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [TINY_MODEL]


def test_a_model_no_peer_serves_is_unavailable(clusters: tuple[Cluster, Cluster]) -> None:
    c, _ = clusters
    key = issue(c, "nobody-serves-this")
    refused = chat(c.url, key["model_access_key"], model="nobody-serves-this")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "inference_unavailable"


def test_a_cluster_refuses_keys_of_an_issuer_it_does_not_list(
    api_server: ApiServer, clusters: tuple[Cluster, Cluster]
) -> None:
    c, _ = clusters
    key = issue(c)  # the session's API lists no peers: c's keys mean nothing there
    refused = chat(api_server.url, key["model_access_key"])
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "unauthorized"


PEER = '[[peers]]\nname = "b"\nurl = "http://b.example:8000/"\nissuer = "cave-b"\nmodels = ["m"]\n'


def test_a_peers_file_is_read_in_order(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    path.write_text("cooldown_s = 5\n" + PEER + PEER.replace('"b"', '"b2"', 1))
    found = load_peers(path, "cave")
    assert [(p.name, p.url, p.issuer, p.models) for p in found.peers] == [
        ("b", "http://b.example:8000", "cave-b", ("m",)),
        ("b2", "http://b.example:8000", "cave-b", ("m",)),
    ]
    assert found.cooldown_s == 5


@pytest.mark.parametrize(
    "text",
    [
        "[[peers]\n",
        "colour = 1\n" + PEER,
        PEER.replace('models = ["m"]', 'models = "m"'),
        PEER.replace("http://", "ftp://"),
        PEER.replace('name = "b"\n', ""),
        PEER + PEER,
        PEER.replace('"cave-b"', '"cave"'),
        "cooldown_s = 0\n" + PEER,
    ],
    ids=[
        "not-toml",
        "unknown-key",
        "models-not-list",
        "not-http",
        "no-name",
        "same-name",
        "own-issuer",
        "zero-cooldown",
    ],
)
def test_a_malformed_peers_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="CAVE_PEERS_FILE"):
        load_peers(path, "cave")


def test_a_failed_peer_is_skipped_for_the_cooldown_then_tried_again() -> None:
    now = [100.0]
    health = PeerHealth(cooldown_s=30, clock=lambda: now[0])
    assert health.healthy("b")
    health.failed("b")
    now[0] += 29
    assert not health.healthy("b")
    now[0] += 1
    assert health.healthy("b")
    health.failed("b")
    health.succeeded("b")  # a probe or request that worked closes the breaker
    assert health.healthy("b")


CHUNK = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}


async def serve_raw(response: bytes) -> tuple[asyncio.Server, str]:
    """A socket server answering every connection with `response`, then closing it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def route(*responses: bytes) -> tuple[list[tuple[str, dict]], PeerRouter, str | None]:
    """What a PeerRouter over raw peers p0, p1, ... yields, and the error that ended it."""
    servers = [await serve_raw(r) for r in responses]
    peers = [Peer(f"p{i}", url, f"iss-{i}", ("m",)) for i, (_, url) in enumerate(servers)]
    router = PeerRouter(peers, PeerKeys())
    got: list[tuple[str, dict]] = []
    error = None
    try:
        async for item in router.stream("m", "key", "ns", {"model": "m"}):
            got.append(item)
    except InferenceUnavailableError as exc:
        error = exc.message
    finally:
        await router.close()
        for server, _ in servers:
            server.close()
    return got, router, error


def sse(*payloads: dict) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    return head + b"".join(f"data: {json.dumps(p)}\n\n".encode() for p in payloads)


def test_a_peer_failing_with_5xx_before_the_first_token_is_passed_over() -> None:
    broken = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    got, router, error = asyncio.run(route(broken, sse(CHUNK, finish, usage) + b"data: [DONE]\n\n"))
    assert error is None
    assert [name for name, _ in got] == ["p1", "p1"]
    assert got[0][1]["text"] == "Hel" and got[0][1]["peer_failures"] == ["p0: HTTP 502"]
    assert got[1][1] == {
        "text": "",
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "completion_tokens": 1,
    }
    assert not router.health.healthy("p0") and router.health.healthy("p1")


def test_a_peer_failing_mid_stream_ends_the_stream_with_an_error() -> None:
    got, router, error = asyncio.run(route(sse(CHUNK), sse(CHUNK)))  # closes before a finish
    assert [name for name, _ in got] == ["p0"]  # no failover once a token went out
    assert error is not None and error.startswith("peer p0 failed mid-stream")
    assert not router.health.healthy("p0")
