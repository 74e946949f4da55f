"""The MCP tools an agent sees: sandbox lifecycle, commands and files, each a manager call."""

from __future__ import annotations

import base64
import binascii
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal, Protocol

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from cave.auth.keys import Principal
from cave.errors import CaveError, InvalidArgumentError
from deployments.schemas import (
    CreatedSandboxOut,
    CreateSandboxRequest,
    ExecOut,
    ExecRequest,
    FileList,
    FileWritten,
    Limits,
    SandboxOut,
    SandboxPage,
    SandboxState,
)


class SandboxService(Protocol):
    """The part of deployments.sandboxes.manager.SandboxManager the tools call."""

    async def create(
        self, principal: Principal, request: CreateSandboxRequest
    ) -> CreatedSandboxOut: ...
    async def get(self, principal: Principal, sandbox_id: str) -> SandboxOut: ...
    async def list(
        self,
        principal: Principal,
        *,
        state: str | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        namespace: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SandboxPage: ...
    async def stop(self, principal: Principal, sandbox_id: str) -> SandboxOut: ...
    async def run(self, principal: Principal, sandbox_id: str, request: ExecRequest) -> ExecOut: ...
    async def write_file(
        self, principal: Principal, sandbox_id: str, path: str, data: bytes
    ) -> FileWritten: ...
    async def read_file(self, principal: Principal, sandbox_id: str, path: str) -> bytes: ...
    async def list_files(
        self, principal: Principal, sandbox_id: str, path: str = ""
    ) -> FileList: ...


class FileContent(BaseModel):
    """A file read from a sandbox."""

    path: str
    content: str = Field(description="The file's bytes: UTF-8 text, or base64 when not UTF-8.")
    encoding: Literal["utf-8", "base64"]
    size: int = Field(description="Size in bytes.")


SandboxId = Annotated[str, Field(description="The sandbox id returned by create_sandbox.")]
FilePath = Annotated[
    str, Field(description="Path relative to the sandbox workspace (e.g. `src/main.py`).")
]
Encoding = Literal["utf-8", "base64"]

_READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_OVERWRITE = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)
_RUN = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True)


def register_tools(
    server: MCPServer, manager: SandboxService, principal: Callable[[], Principal]
) -> None:
    """Add the sandbox tools to `server`; `principal()` names who the current request acts for."""

    async def create_sandbox(
        name: Annotated[str, Field(max_length=128, description="A label for humans.")] = "",
        memory_mb: Annotated[int | None, Field(ge=1, description="Memory limit in MiB.")] = None,
        cpu: Annotated[float | None, Field(gt=0, description="CPU cores (e.g. 0.5).")] = None,
        timeout_s: Annotated[
            float | None, Field(gt=0, description="Default time limit of each command, seconds.")
        ] = None,
        ttl_s: Annotated[
            float | None, Field(gt=0, description="Stop the sandbox this long after it starts.")
        ] = None,
        labels: Annotated[
            dict[str, str] | None, Field(description="Key/value tags, usable in list_sandboxes.")
        ] = None,
        namespace: Annotated[
            str | None, Field(description="Admin keys only: the namespace to create it in.")
        ] = None,
        wait_s: Annotated[
            float,
            Field(
                ge=0,
                le=3600,
                description="When every node is full, wait up to this long for room instead of "
                "failing at once.",
            ),
        ] = 0,
    ) -> Annotated[CallToolResult, CreatedSandboxOut]:
        """Create and start an isolated Linux sandbox with an empty workspace.

        Returns the sandbox (its `id` is what the other tools take) in state `running`. Unset
        limits take the operator's defaults. Stop it with stop_sandbox when done.
        """

        async def create() -> CreatedSandboxOut:
            limits = Limits(memory_mb=memory_mb, cpu=cpu, timeout_s=timeout_s)
            request = CreateSandboxRequest(
                name=name,
                namespace=namespace,
                limits=limits,
                labels=labels or {},
                ttl_s=ttl_s,
                wait_s=wait_s,
            )
            return await manager.create(principal(), request)

        return await _answer(create)

    async def run_command(
        sandbox_id: SandboxId,
        command: Annotated[
            str | list[str],
            Field(description="A shell command line (run by /bin/sh -c) or an argv list."),
        ],
        cwd: Annotated[
            str | None,
            Field(description="Working directory (default /workspace, the files' root)."),
        ] = None,
        timeout_s: Annotated[
            float | None, Field(gt=0, description="Kill the command after this many seconds.")
        ] = None,
        stdin: Annotated[
            str | None, Field(description="Text written to the command's stdin.")
        ] = None,
        env: Annotated[
            dict[str, str] | None, Field(description="Extra environment variables.")
        ] = None,
    ) -> Annotated[CallToolResult, ExecOut]:
        """Run a command in the sandbox and wait for it to finish.

        Returns `exit_code`, `stdout`, `stderr` (UTF-8), `timed_out`, `oom_killed` and
        `truncated` (output cut at the sandbox's limit). A non-zero exit code is a normal
        result, not a tool error. Files persist between commands; processes do not.
        """

        async def run() -> ExecOut:
            request = ExecRequest(
                command=command, cwd=cwd, timeout_s=timeout_s, stdin=stdin, env=env or {}
            )
            return await manager.run(principal(), sandbox_id, request)

        return await _answer(run)

    async def write_file(
        sandbox_id: SandboxId,
        path: FilePath,
        content: Annotated[str, Field(description="The whole new content of the file.")],
        encoding: Annotated[
            Encoding, Field(description="`utf-8` for text, `base64` for binary content.")
        ] = "utf-8",
    ) -> Annotated[CallToolResult, FileWritten]:
        """Create or overwrite a file in the sandbox workspace (parent directories are made)."""
        return await _answer(
            lambda: manager.write_file(principal(), sandbox_id, path, _decode(content, encoding))
        )

    async def read_file(
        sandbox_id: SandboxId, path: FilePath
    ) -> Annotated[CallToolResult, FileContent]:
        """Read a file from the sandbox workspace.

        Text comes back as UTF-8 (`encoding: "utf-8"`); anything else as base64.
        """

        async def read() -> FileContent:
            return _file_content(path, await manager.read_file(principal(), sandbox_id, path))

        return await _answer(read)

    async def list_files(
        sandbox_id: SandboxId,
        path: Annotated[
            str, Field(description="Directory relative to the workspace; empty for its root.")
        ] = "",
    ) -> Annotated[CallToolResult, FileList]:
        """List a directory of the sandbox workspace: each entry's name, type and size."""
        return await _answer(lambda: manager.list_files(principal(), sandbox_id, path))

    async def get_sandbox(sandbox_id: SandboxId) -> Annotated[CallToolResult, SandboxOut]:
        """Show one sandbox: its state (`running`, `stopped`, ...), limits, labels and times."""
        return await _answer(lambda: manager.get(principal(), sandbox_id))

    async def stop_sandbox(sandbox_id: SandboxId) -> Annotated[CallToolResult, SandboxOut]:
        """Stop a sandbox: its processes are killed and its workspace is deleted.

        The record stays (state `stopped`). Stopping a stopped sandbox changes nothing.
        """
        return await _answer(lambda: manager.stop(principal(), sandbox_id))

    async def list_sandboxes(
        state: Annotated[
            SandboxState | None, Field(description="Only sandboxes in this state.")
        ] = None,
        labels: Annotated[
            dict[str, str] | None, Field(description="Only sandboxes carrying all these labels.")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=200, description="Page size.")] = 50,
        cursor: Annotated[
            str | None, Field(description="`next_cursor` of the previous page.")
        ] = None,
    ) -> Annotated[CallToolResult, SandboxPage]:
        """List the sandboxes this key can see, newest first, one page at a time."""
        return await _answer(
            lambda: manager.list(
                principal(), state=state, labels=labels, limit=limit, cursor=cursor
            )
        )

    tools: list[tuple[Callable[..., Awaitable[CallToolResult]], ToolAnnotations]] = [
        (create_sandbox, _WRITE),
        (run_command, _RUN),
        (write_file, _OVERWRITE),
        (read_file, _READ),
        (list_files, _READ),
        (get_sandbox, _READ),
        (stop_sandbox, _OVERWRITE),
        (list_sandboxes, _READ),
    ]
    for tool, hints in tools:
        # cleandoc: the agent reads the docstring as the description, without our indentation.
        description = inspect.cleandoc(tool.__doc__ or "")
        server.add_tool(tool, description=description, annotations=hints)


async def _answer(work: Callable[[], Awaitable[BaseModel]]) -> CallToolResult:
    """The tool's result; a CaveError or a refused value becomes an error result, never a crash."""
    try:
        out = await work()
    except CaveError as exc:
        return _failure(exc.code, exc.message)
    except ValidationError as exc:
        return _failure("validation_error", _describe(exc))
    data = out.model_dump(mode="json")
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(data))], structured_content=data
    )


def _failure(code: str, message: str) -> CallToolResult:
    # The text is what most agents read; the structured copy is for programs.
    return CallToolResult(
        content=[TextContent(type="text", text=f"{code}: {message}")],
        structured_content={"error": {"code": code, "message": message}},
        is_error=True,
    )


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'value'}: {err['msg']}"
        for err in exc.errors()
    )


def _decode(content: str, encoding: Encoding) -> bytes:
    if encoding == "utf-8":
        return content.encode()
    try:
        return base64.b64decode(content, validate=True)
    except binascii.Error as exc:
        raise InvalidArgumentError(f"content is not valid base64: {exc}") from exc


def _file_content(path: str, data: bytes) -> FileContent:
    try:
        return FileContent(path=path, content=data.decode(), encoding="utf-8", size=len(data))
    except UnicodeDecodeError:
        text = base64.b64encode(data).decode("ascii")
        return FileContent(path=path, content=text, encoding="base64", size=len(data))
