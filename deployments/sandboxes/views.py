"""How sandbox rows and exec results become API schemas and metric labels, and the list cursor."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Literal

from actors.isolation.results import ExecResult, FileEntry
from cave.auth import api_keys
from cave.db import SandboxRow
from cave.errors import InvalidArgumentError
from deployments.schemas import ExecOut, FileEntryOut, IsolationOut, LimitsOut, SandboxOut

ExecOutcome = Literal["ok", "nonzero", "timed_out", "oom_killed", "error"]
_FILE_TYPES = {"file", "dir", "symlink"}


def sandbox_out(row: SandboxRow) -> SandboxOut:
    return SandboxOut(
        id=row.id,
        name=row.name,
        namespace=row.namespace_id,
        state=row.state,  # type: ignore[arg-type]  # the column holds only SandboxState values
        node_id=row.node_id,
        limits=LimitsOut.model_validate(row.limits),
        labels=row.labels,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        stopped_at=row.stopped_at,
        expires_at=row.expires_at,
        idle_timeout_s=row.idle_timeout_s,
        failure=row.failure,
        api_key_masked=api_keys.mask(row.api_key_id) if row.api_key_id else None,
        isolation=IsolationOut.model_validate(row.isolation) if row.isolation else None,
    )


def exec_out(execution_id: str, result: ExecResult, stdout: bytes, stderr: bytes) -> ExecOut:
    return ExecOut(
        execution_id=execution_id,
        exit_code=result.exit_code,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        duration_ms=round(result.duration_ms),
        timed_out=result.timed_out,
        oom_killed=result.oom_killed,
        truncated=result.truncated,
    )


def exec_outcome(*, exit_code: int, timed_out: bool, oom_killed: bool) -> ExecOutcome:
    """The outcome label of a finished command; a kill by the limits wins over its exit code."""
    if timed_out:
        return "timed_out"
    if oom_killed:
        return "oom_killed"
    return "ok" if exit_code == 0 else "nonzero"


def file_entry_out(entry: FileEntry) -> FileEntryOut:
    kind = entry.type if entry.type in _FILE_TYPES else "other"
    return FileEntryOut(name=entry.name, type=kind, size=entry.size)  # type: ignore[arg-type]


def encode_cursor(created_at: datetime, sandbox_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), sandbox_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, sandbox_id = json.loads(raw)
        return datetime.fromisoformat(when), str(sandbox_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"cursor {cursor!r} is not one this API gave out") from exc
