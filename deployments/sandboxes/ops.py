"""Exec and file calls on running sandboxes: scope checks, the actor-handle cache, exec records."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from actors import remote
from actors.isolation.results import ExecResult, FileEntry, OutputChunk
from actors.sandbox_actor import command_argv
from actors.sandbox_ref import SandboxRef
from cave.audit.trail import AuditTrail
from cave.auth.keys import Principal
from cave.db import Database, ExecutionRow, SandboxRow, admitted, new_id, utcnow
from cave.errors import PayloadTooLargeError, SandboxNotFoundError, SandboxStateError
from config.api import INLINE_OUTPUT_BYTES, MAX_FILE_BYTES
from deployments.sandboxes.exec_records import ExecRecorder
from deployments.sandboxes.views import ExecOutcome, exec_out, exec_outcome, file_entry_out
from deployments.schemas import ExecEvent, ExecOut, ExecRequest, FileList, FileWritten
from deployments.spans import span

T = TypeVar("T")
# MAX_FILE_BYTES: one PUT, bigger files go in pieces (append is a later feature);
# INLINE_OUTPUT_BYTES: per stream of a non-streamed exec, more: the stream. Both are the defaults
# (and the first also the ceiling) of settings, so they live with them in config/api.py.
MAX_STDIN_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Live:
    """What a replica remembers of a running sandbox: enough to authorise and call it."""

    namespace_id: str
    actor: SandboxRef


class SandboxOps:
    def __init__(self, db: Database, audit: AuditTrail, recorder: ExecRecorder) -> None:
        self.db = db
        self.audit = audit
        self.recorder = recorder
        self.exec_observer: Callable[[ExecOutcome, float], None] | None = None  # metrics
        self.inline_output_bytes = INLINE_OUTPUT_BYTES  # CAVE_API_EXEC_OUTPUT_BYTES
        self.live: dict[str, Live] = {}
        self.active: dict[str, datetime] = {}  # last exec or file call, flushed in batches
        self.busy: dict[str, int] = {}  # calls running now: a sandbox is not idle during one

    def _session(self, principal: Principal) -> AbstractAsyncContextManager[Any]:
        """A read-only transaction that sees what the principal may see."""
        return self.db.read_session(None if principal.is_admin else principal.namespace_id)

    async def _load(self, principal: Principal, sandbox_id: str) -> SandboxRow:
        """The record as the principal may see it; another namespace's is "not found"."""
        async with self._session(principal) as session:
            row: SandboxRow | None = await session.get(SandboxRow, sandbox_id)
        if row is None or row.state == "deleted":
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")
        return row

    async def _resolve(self, principal: Principal, sandbox_id: str, scope: str) -> Live:
        principal.require(scope, sandbox_id)  # a sandbox's own key: this sandbox only
        live = self.live.get(sandbox_id)
        if live is not None:
            if principal.is_admin or principal.namespace_id == live.namespace_id:
                return live
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")
        row = await self._load(principal, sandbox_id)
        if row.state != "running":
            raise SandboxStateError(f"sandbox {sandbox_id} is {row.state}, not running")
        actor = await remote.lookup(sandbox_id)
        if actor is None:
            raise SandboxStateError(f"sandbox {sandbox_id} is lost: its actor is gone")
        live = self.live[sandbox_id] = Live(row.namespace_id, actor)
        return live

    async def ensure_running(self, principal: Principal, sandbox_id: str) -> None:
        """Raise what an exec would raise before it starts (not found, not running, scope)."""
        await self._resolve(principal, sandbox_id, "sandboxes:write")

    async def _on_actor(
        self,
        principal: Principal,
        sandbox_id: str,
        scope: str,
        call: Callable[[SandboxRef], Awaitable[T]],
    ) -> tuple[Live, T]:
        """Call the sandbox's actor; a cached handle that turns out dead (another replica stopped
        or restarted the sandbox) is dropped and the record consulted once more."""
        live = await self._resolve(principal, sandbox_id, scope)
        admitted()  # what the actor does must be recorded: no refusal as overload after it
        with self._in_use(sandbox_id):
            try:
                result = await call(live.actor)
            except SandboxStateError:
                if self.live.pop(sandbox_id, None) is None:
                    raise
                live = await self._resolve(principal, sandbox_id, scope)
                result = await call(live.actor)
        return live, result

    @contextmanager
    def _in_use(self, sandbox_id: str) -> Iterator[None]:
        """Counts the calls running on a sandbox, so that an exec longer than the idle timeout
        does not get its sandbox stopped under it; its end is the sandbox's last activity."""
        self.busy[sandbox_id] = self.busy.get(sandbox_id, 0) + 1
        try:
            yield
        finally:
            self.active[sandbox_id] = utcnow()
            left = self.busy.pop(sandbox_id, 1) - 1
            if left > 0:
                self.busy[sandbox_id] = left

    # -- exec --------------------------------------------------------------------------------

    async def run(self, principal: Principal, sandbox_id: str, request: ExecRequest) -> ExecOut:
        argv, kwargs = _exec_args(request)
        started = utcnow()
        with span("sandbox.exec", sandbox_id=sandbox_id):
            live, output = await self._on_actor(
                principal,
                sandbox_id,
                "sandboxes:write",
                lambda actor: remote.run(
                    actor, sandbox_id, argv, inline_bytes=self.inline_output_bytes, **kwargs
                ),
            )
        digest = _Digest()
        digest.add("stdout", output.stdout)
        digest.add("stderr", output.stderr)
        execution_id = await self._record_exec(
            principal, sandbox_id, live, argv, started, output.result, digest
        )
        return exec_out(execution_id, output.result, output.stdout, output.stderr)

    async def exec_stream(
        self,
        principal: Principal,
        sandbox_id: str,
        request: ExecRequest,
        interactive: bool = False,
    ) -> AsyncIterator[ExecEvent]:
        """Events as the command writes: a `started` event first when interactive (its
        execution_id is what write_stdin takes), then stdout/stderr chunks, then the result."""
        argv, kwargs = _exec_args(request)
        if interactive:
            kwargs["interactive"] = True
        live = await self._resolve(principal, sandbox_id, "sandboxes:write")
        started, digest = utcnow(), _Digest()
        with self._in_use(sandbox_id):
            async for item in remote.stream(live.actor, sandbox_id, argv, **kwargs):
                if isinstance(item, OutputChunk):
                    digest.add(item.stream, item.data)
                    text = item.data.decode("utf-8", "replace")
                    yield ExecEvent(type=item.stream, data=text)  # type: ignore[arg-type]
                elif isinstance(item, ExecResult):
                    execution_id = await self._record_exec(
                        principal, sandbox_id, live, argv, started, item, digest
                    )
                    yield ExecEvent(type="result", result=exec_out(execution_id, item, b"", b""))
                else:  # interactive: the exec's id for its stdin
                    yield ExecEvent(type="started", execution_id=str(item.exec_id))

    async def write_stdin(
        self, principal: Principal, sandbox_id: str, exec_id: str, data: bytes | None
    ) -> None:
        """Write to a running interactive exec's stdin; None closes it."""
        live = await self._resolve(principal, sandbox_id, "sandboxes:write")
        if data is None:
            await remote.call(sandbox_id, live.actor.close_stdin.remote(exec_id))
        else:
            await remote.call(sandbox_id, live.actor.write_stdin.remote(exec_id, data))

    async def _record_exec(
        self,
        principal: Principal,
        sandbox_id: str,
        live: Live,
        argv: list[str],
        started: datetime,
        result: ExecResult,
        digest: _Digest,
    ) -> str:
        """The execution record and its audit event, written together (in a batch)."""
        if self.exec_observer is not None:
            outcome = exec_outcome(
                exit_code=result.exit_code, timed_out=result.timed_out, oom_killed=result.oom_killed
            )
            self.exec_observer(outcome, result.duration_ms / 1000)
        row = ExecutionRow(
            id=new_id(),
            sandbox_id=sandbox_id,
            namespace_id=live.namespace_id,
            command=argv,
            exit_code=result.exit_code,
            started_at=started,
            duration_ms=round(result.duration_ms),
            timed_out=result.timed_out,
            oom_killed=result.oom_killed,
            truncated=result.truncated,
            stdout_bytes=result.stdout_bytes,
            stderr_bytes=result.stderr_bytes,
            output_sha256=digest.hexdigest(),
        )
        details = {"execution_id": row.id, "exit_code": result.exit_code}
        event = principal.audit_event("sandbox.exec", sandbox_id, live.namespace_id, details)
        await self.recorder.record(event, row)
        return row.id

    # -- files -------------------------------------------------------------------------------

    async def write_file(
        self, principal: Principal, sandbox_id: str, path: str, data: bytes
    ) -> FileWritten:
        if len(data) > MAX_FILE_BYTES:
            raise PayloadTooLargeError(f"a file may be at most {MAX_FILE_BYTES} bytes")
        size: int
        live, size = await self._on_actor(
            principal,
            sandbox_id,
            "sandboxes:write",
            lambda actor: remote.call(sandbox_id, actor.write_file.remote(path, data)),
        )
        await self._audit_file(principal, sandbox_id, live, "sandbox.file_write", path)
        return FileWritten(path=path, size=size)

    async def read_file(self, principal: Principal, sandbox_id: str, path: str) -> bytes:
        data: bytes
        _, data = await self._on_actor(
            principal,
            sandbox_id,
            "sandboxes:read",
            lambda actor: remote.call(sandbox_id, actor.read_file.remote(path)),
        )
        return data

    async def list_files(self, principal: Principal, sandbox_id: str, path: str = "") -> FileList:
        entries: list[FileEntry]
        _, entries = await self._on_actor(
            principal,
            sandbox_id,
            "sandboxes:read",
            lambda actor: remote.call(sandbox_id, actor.list_files.remote(path)),
        )
        return FileList(path=path, entries=[file_entry_out(e) for e in entries])

    async def delete_file(
        self, principal: Principal, sandbox_id: str, path: str, recursive: bool = False
    ) -> None:
        live, _ = await self._on_actor(
            principal,
            sandbox_id,
            "sandboxes:write",
            lambda actor: remote.call(sandbox_id, actor.delete_file.remote(path, recursive)),
        )
        await self._audit_file(principal, sandbox_id, live, "sandbox.file_delete", path)

    async def _audit_file(
        self, principal: Principal, sandbox_id: str, live: Live, action: str, path: str
    ) -> None:
        event = principal.audit_event(action, sandbox_id, live.namespace_id, {"path": path})
        await self.recorder.record(event)  # batched with the execs: files are a hot path too


class _Digest:
    """sha256 of sha256(stdout) || sha256(stderr): computable while the output streams."""

    def __init__(self) -> None:
        self._streams = {"stdout": hashlib.sha256(), "stderr": hashlib.sha256()}

    def add(self, stream: str, data: bytes) -> None:
        self._streams[stream].update(data)

    def hexdigest(self) -> str:
        joined = self._streams["stdout"].digest() + self._streams["stderr"].digest()
        return hashlib.sha256(joined).hexdigest()


def _exec_args(request: ExecRequest) -> tuple[list[str], dict[str, Any]]:
    argv = command_argv(request.command)
    stdin = request.stdin.encode() if request.stdin is not None else None
    if stdin is not None and len(stdin) > MAX_STDIN_BYTES:
        raise PayloadTooLargeError(f"stdin may be at most {MAX_STDIN_BYTES} bytes")
    kwargs: dict[str, Any] = {
        "env": request.env or None,
        "cwd": request.cwd,
        "stdin": stdin,
        "timeout_s": request.timeout_s,
    }
    return argv, kwargs
