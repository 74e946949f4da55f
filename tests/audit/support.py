"""Helpers of the audit tests: settings in a scratch dir, events, the lines of a log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cave.audit import AuditEvent, AuditLogWriter, AuditSettings


def settings(path: Path, key: bytes, **overrides: Any) -> AuditSettings:
    return AuditSettings(enabled=True, path=path, hmac_key=key, **overrides)


def event(i: int = 0, **overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "actor": "key_abc123",
        "action": "sandbox.exec",
        "target": f"sbx_{i:04d}",
        "namespace": "team-a",
        "details": {"argv": ["echo", "grüße"], "exit_code": 0, "i": i},
    }
    return AuditEvent(**{**fields, **overrides})


def write(path: Path, key: bytes, count: int, **overrides: Any) -> list[int]:
    """Append `count` events with a fresh writer; their seqs."""
    with AuditLogWriter(settings(path, key, **overrides)) as writer:
        return [writer.append(event(i)) for i in range(count)]


def lines(path: Path) -> list[bytes]:
    """The lines of `path`, split on b"\\n" only, each with its newline (not a torn last one)."""
    parts = path.read_bytes().split(b"\n")
    return [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]
