"""Each API call as data: method, path, query, body and how to read the answer (no I/O here).

The sync and async clients both build their requests here and differ only in how they send
them, so the contract of docs/api.md is written down once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from cave.client._models import (
    ApiKey,
    CreatedApiKey,
    ExecResult,
    FileList,
    FileWritten,
    KeyKind,
    Limits,
    SandboxInfo,
    SandboxPage,
    SandboxState,
    limits_body,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
SANDBOXES = "/api/v1/sandboxes"
KEYS = "/api/v1/auth/keys"
NDJSON = "application/x-ndjson"
CLIENT_TIMEOUT = -1.0
"""A `Call.read_timeout_s` that keeps the client's own timeout."""
EXEC_GRACE_S = 30.0
"""How much longer than the command's own timeout the client waits for exec's answer."""


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    read_timeout_s: float | None = CLIENT_TIMEOUT
    """None waits as long as it takes (an exec without a timeout of its own)."""

    @property
    def retryable(self) -> bool:
        """Only reads are retried: a retried POST could run a command twice."""
        return self.method == "GET"


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate(response.json())


def _nothing(response: httpx.Response) -> None:
    return None


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _keys(response: httpx.Response) -> list[ApiKey]:
    return [ApiKey.model_validate(item) for item in response.json()["items"]]


def _sandbox(sandbox_id: str, *rest: str) -> str:
    return "/".join([SANDBOXES, quote(sandbox_id, safe=""), *rest])


def _file(sandbox_id: str, path: str) -> str:
    # Slashes stay: the server's route takes the rest of the URL as the path.
    return _sandbox(sandbox_id, "files", quote(path, safe="/"))


def _without_none(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


POOL_LABEL = "cave.pool"  # the node pool a sandbox asks for (docs/placement.md)
CREATE_READ_S = 60.0  # a start after the wait: the usual worst case of a cold create


def create_sandbox(
    *,
    name: str,
    limits: Limits | dict[str, Any] | None,
    labels: Mapping[str, str] | None,
    ttl_s: float | None,
    idle_timeout_s: float | None,
    namespace: str | None,
    start: bool,
    pool: str | None = None,
    wait_s: float | None = None,
) -> Call[SandboxInfo]:
    labels = {**(labels or {}), **({POOL_LABEL: pool} if pool else {})}
    body = _without_none(
        name=name,
        namespace=namespace,
        limits=limits_body(limits) or None,
        labels=labels or None,
        ttl_s=ttl_s,
        idle_timeout_s=idle_timeout_s,
        start=start,
        wait_s=wait_s,
    )
    # A create that may wait for room answers that much later than usual.
    read_s = CLIENT_TIMEOUT if not wait_s else wait_s + EXEC_GRACE_S + CREATE_READ_S
    return Call("POST", SANDBOXES, _model(SandboxInfo), json=body, read_timeout_s=read_s)


def list_sandboxes(
    *,
    state: SandboxState | None,
    name: str | None,
    labels: Mapping[str, str] | None,
    namespace: str | None,
    limit: int | None,
    cursor: str | None,
) -> Call[SandboxPage]:
    query = _without_none(state=state, name=name, namespace=namespace, limit=limit, cursor=cursor)
    params = [(key, str(value)) for key, value in query.items()]
    params += [("label", f"{key}={value}") for key, value in (labels or {}).items()]
    return Call("GET", SANDBOXES, _model(SandboxPage), params=params)


def get_sandbox(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("GET", _sandbox(sandbox_id), _model(SandboxInfo))


def start_sandbox(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("POST", _sandbox(sandbox_id, "start"), _model(SandboxInfo))


def stop_sandbox(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("POST", _sandbox(sandbox_id, "stop"), _model(SandboxInfo))


def delete_sandbox(sandbox_id: str) -> Call[None]:
    return Call("DELETE", _sandbox(sandbox_id), _nothing)


def exec_command(
    sandbox_id: str,
    command: str | list[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: str | None,
    timeout_s: float | None,
    stream: bool = False,
) -> Call[ExecResult]:
    """A str runs under /bin/sh -c, a list as argv. The answer is awaited past the timeout."""
    body = _without_none(
        command=command if isinstance(command, str) else list(command),
        env=dict(env) if env else None,
        cwd=cwd,
        stdin=stdin,
        timeout_s=timeout_s,
    )
    headers = {"Accept": NDJSON} if stream else {}
    wait_s = None if timeout_s is None else timeout_s + EXEC_GRACE_S
    return Call(
        "POST",
        _sandbox(sandbox_id, "exec"),
        _model(ExecResult),
        json=body,
        headers=headers,
        read_timeout_s=wait_s,
    )


def write_file(sandbox_id: str, path: str, data: bytes | str) -> Call[FileWritten]:
    content = data.encode() if isinstance(data, str) else bytes(data)
    headers = {"Content-Type": "application/octet-stream"}
    return Call(
        "PUT", _file(sandbox_id, path), _model(FileWritten), content=content, headers=headers
    )


def read_file(sandbox_id: str, path: str) -> Call[bytes]:
    return Call("GET", _file(sandbox_id, path), _bytes)


def list_files(sandbox_id: str, path: str) -> Call[FileList]:
    return Call("GET", _sandbox(sandbox_id, "files"), _model(FileList), params=[("path", path)])


def delete_file(sandbox_id: str, path: str, recursive: bool) -> Call[None]:
    params = [("recursive", "true" if recursive else "false")]
    return Call("DELETE", _file(sandbox_id, path), _nothing, params=params)


def create_key(
    *,
    kind: KeyKind,
    namespace: str | None,
    scopes: list[str] | None,
    name: str,
    ttl_s: float | None,
) -> Call[CreatedApiKey]:
    body = _without_none(
        kind=kind, namespace=namespace, scopes=list(scopes or []), name=name, ttl_s=ttl_s
    )
    return Call("POST", KEYS, _model(CreatedApiKey), json=body)


def list_keys(namespace: str | None) -> Call[list[ApiKey]]:
    params = [("namespace", namespace)] if namespace else []
    return Call("GET", KEYS, _keys, params=params)


def revoke_key(key_id: str) -> Call[None]:
    return Call("DELETE", f"{KEYS}/{quote(key_id, safe='')}", _nothing)


def rotate_key(key_id: str, grace_s: float | None) -> Call[CreatedApiKey]:
    path = f"{KEYS}/{quote(key_id, safe='')}/rotate"
    return Call("POST", path, _model(CreatedApiKey), json=_without_none(grace_s=grace_s))
