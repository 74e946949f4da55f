"""What an exec streams back: (an interactive one's id,) output chunks as they come, one result."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecStarted:
    """First item of an interactive exec: the id to write its stdin with."""

    exec_id: str


@dataclass(frozen=True)
class OutputChunk:
    stream: str  # "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    duration_ms: float
    timed_out: bool
    oom_killed: bool
    truncated: bool  # some output went past output_bytes on at least one stream and was dropped
    stdout_bytes: int  # bytes the command wrote, counted even where dropped
    stderr_bytes: int


@dataclass(frozen=True)
class FileEntry:
    name: str
    type: str  # "file" | "dir" | "symlink"
    size: int
    mode: int
    mtime: float
