"""cave.client over real HTTP against the real API: lifecycle, streaming, errors, pages, keys."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cave.client import (
    APIConnectionError,
    AsyncCave,
    AuthenticationError,
    CapacityError,
    Cave,
    ConflictError,
    ExecResult,
    NotFoundError,
    OutputChunk,
    PermissionDeniedError,
    SandboxNotFoundError,
    ValidationError,
)

NamespaceKey = Callable[[str, list[str]], str]


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def client(api_server: Any) -> Iterator[Cave]:
    with Cave(api_server.url, api_server.admin_key) as cave:
        yield cave


def test_sandbox_lifecycle(client: Cave) -> None:
    sandbox = client.sandboxes.create(name=unique("life"), limits={"memory_mb": 256})
    assert sandbox.state == "running"
    assert sandbox.info.limits.memory_mb == 256
    assert sandbox.api_key and sandbox.api_key.startswith("cave_live_")

    shell = sandbox.exec("echo out; echo err >&2; exit 3")
    assert (shell.exit_code, shell.stdout, shell.stderr) == (3, "out\n", "err\n")
    argv = sandbox.exec(["printf", "%s|", "a b", "c"])
    assert argv.stdout == "a b|c|"
    given = sandbox.exec("cat; echo $GREETING", env={"GREETING": "hi"}, stdin="in\n")
    assert given.stdout == "in\nhi\n"

    written = sandbox.write_file("data/note.txt", "héllo")
    assert written.size == len("héllo".encode())
    assert sandbox.read_file("data/note.txt") == "héllo".encode()
    blob = bytes(range(256))
    sandbox.write_file("data/blob.bin", blob)
    assert sandbox.read_file("data/blob.bin") == blob
    assert sandbox.exec("cat data/note.txt").stdout == "héllo"
    entries = {entry.name: entry for entry in sandbox.list_files("data").entries}
    assert entries["note.txt"].type == "file" and entries["blob.bin"].size == 256
    sandbox.delete_file("data/note.txt")
    assert "note.txt" not in {entry.name for entry in sandbox.list_files("data").entries}

    assert sandbox.stop().state == "stopped"
    assert client.sandboxes.get(sandbox.id).state == "stopped"
    with pytest.raises(ConflictError):
        sandbox.exec("true")
    sandbox.delete()
    with pytest.raises(SandboxNotFoundError) as missing:
        client.sandboxes.get(sandbox.id)
    assert missing.value.status_code == 404


def test_start_after_stop_gives_a_fresh_workspace(client: Cave) -> None:
    with client.sandboxes.create(name=unique("restart"), start=False) as sandbox:
        assert sandbox.state == "created"
        assert sandbox.start().state == "running"
        sandbox.write_file("kept.txt", "x")
        sandbox.stop()
        sandbox.start()
        assert sandbox.refresh().state == "running"
        assert "kept.txt" not in sandbox.exec("ls -a").stdout


@pytest.mark.anyio
async def test_async_exec_stream_sends_chunks_before_the_result(api_server: Any) -> None:
    async with (
        AsyncCave(api_server.url, api_server.admin_key) as cave,
        await cave.sandboxes.create(name=unique("stream")) as sandbox,
    ):
        stream = sandbox.exec_stream("for i in 1 2 3; do echo $i; sleep 0.2; done")
        events = [event async for event in stream]
    *head, result = events
    chunks = [event for event in head if isinstance(event, OutputChunk)]
    assert chunks and len(chunks) == len(head)
    assert "".join(chunk.data for chunk in chunks if chunk.stream == "stdout") == "1\n2\n3\n"
    assert isinstance(result, ExecResult)
    assert (result.exit_code, result.stdout) == (0, "")


@pytest.mark.anyio
async def test_async_exec_stream_is_live(api_server: Any) -> None:
    """The command waits for a file that the test writes only after the first chunk came:
    a stream held back until the command ends would never let it finish."""
    command = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo done"
    seen: list[str] = []
    result = None
    async with (
        AsyncCave(api_server.url, api_server.admin_key) as cave,
        await cave.sandboxes.create(name=unique("live")) as sandbox,
    ):
        async for event in sandbox.exec_stream(command, timeout_s=60):
            if isinstance(event, OutputChunk):
                seen.append(event.data)
                if event.data.startswith("ready"):
                    await sandbox.write_file("go", "")
            else:
                result = event
    assert result is not None and not result.timed_out
    assert "".join(seen) == "ready\ndone\n"


def test_sync_exec_stream_yields_chunks_then_result(client: Cave) -> None:
    with client.sandboxes.create(name=unique("sync-stream")) as sandbox:
        events = list(sandbox.exec_stream(["sh", "-c", "echo a; echo b >&2; exit 4"]))
    chunks = {(e.stream, e.data) for e in events if isinstance(e, OutputChunk)}
    assert chunks == {("stdout", "a\n"), ("stderr", "b\n")}
    assert isinstance(events[-1], ExecResult) and events[-1].exit_code == 4


def test_unknown_sandbox_is_not_found(client: Cave) -> None:
    with pytest.raises(SandboxNotFoundError) as caught:
        client.sandboxes.get("no-such-sandbox")
    error = caught.value
    assert (error.status_code, error.code) == (404, "sandbox_not_found")
    assert error.request_id
    with pytest.raises(NotFoundError):
        client.sandboxes.exec("no-such-sandbox", "true")
    with pytest.raises(NotFoundError):
        list(client.sandboxes.exec_stream("no-such-sandbox", "true"))


def test_bad_key_is_an_authentication_error(api_server: Any) -> None:
    with (
        Cave(api_server.url, "cave_live_nope_nope") as cave,
        pytest.raises(AuthenticationError) as caught,
    ):
        cave.sandboxes.list()
    assert caught.value.status_code == 401


def test_malformed_request_is_a_validation_error(client: Cave) -> None:
    with pytest.raises(ValidationError) as caught:
        client.sandboxes.create(limits={"memory_mb": 0})
    assert (caught.value.status_code, caught.value.code) == (422, "validation_error")
    assert caught.value.details and "memory_mb" in str(caught.value.details)
    with pytest.raises(ValidationError) as refused:
        client.sandboxes.create(limits={"memory_mb": 10_000_000})
    assert refused.value.status_code == 400


def test_namespace_keys_are_fenced(
    client: Cave, api_server: Any, namespace_key: NamespaceKey
) -> None:
    other = client.sandboxes.create(name=unique("fence"), namespace=unique("other"), start=False)
    reader = namespace_key(unique("reader"), ["sandboxes:read"])
    with Cave(api_server.url, reader) as cave:
        with pytest.raises(PermissionDeniedError) as denied:
            cave.sandboxes.create(start=False)
        assert denied.value.status_code == 403
        with pytest.raises(NotFoundError):
            cave.sandboxes.get(other.id)
    other.delete()


def test_unreachable_api_is_a_connection_error() -> None:
    with (
        Cave("http://127.0.0.1:9", "cave_live_x_y", max_retries=1) as cave,
        pytest.raises(APIConnectionError),
    ):
        cave.sandboxes.list()


def test_iter_all_follows_the_cursor(client: Cave) -> None:
    label = {"page-test": unique("run")}
    made = [client.sandboxes.create(labels=label, start=False) for _ in range(5)]
    first = client.sandboxes.list(labels=label, limit=2)
    assert len(first.items) == 2 and first.next_cursor
    listed = [info.id for info in client.sandboxes.iter_all(labels=label, page_size=2)]
    assert listed == [sandbox.id for sandbox in reversed(made)]  # newest first
    for sandbox in made:
        sandbox.delete()
    assert list(client.sandboxes.iter_all(labels=label)) == []


def test_keys_create_use_rotate_revoke(client: Cave, api_server: Any) -> None:
    namespace = unique("keys")
    created = client.keys.create(
        namespace=namespace, scopes=["sandboxes:read"], name="ci", ttl_s=3600
    )
    assert (created.kind, created.namespace, created.name) == ("namespace", namespace, "ci")
    assert created.id in {key.id for key in client.keys.list(namespace=namespace)}
    with Cave(api_server.url, created.key) as cave:
        assert cave.sandboxes.list().items == []

    rotated = client.keys.rotate(created.id, grace_s=0)
    assert rotated.rotated_from_id == created.id and rotated.key != created.key
    client.keys.revoke(rotated.id)
    listed = {key.id: key for key in client.keys.list(namespace=namespace)}
    assert listed[rotated.id].revoked_at is not None
    with Cave(api_server.url, rotated.key) as cave:
        _until_refused(cave)


def _until_refused(cave: Cave, deadline_s: float = 30.0) -> None:
    """A revocation may take a moment to reach every replica's key cache."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            cave.sandboxes.list()
        except AuthenticationError:
            return
        time.sleep(0.2)
    pytest.fail("the revoked key was still accepted")


def test_a_full_pool_is_a_capacity_error_at_once_or_after_the_wait(client: Cave) -> None:
    # This session's node is in no pool: the pool "gpu-only" has no node, so no room ever.
    with pytest.raises(CapacityError, match="'gpu-only'"):
        client.sandboxes.create(pool="gpu-only")
    started = time.monotonic()
    with pytest.raises(CapacityError, match="within 0.5 s"):
        client.sandboxes.create(pool="gpu-only", wait_s=0.5)
    assert time.monotonic() - started >= 0.5  # it waited, then gave up
    assert not [s for s in client.sandboxes.list().items if s.labels.get("cave.pool")]
