"""What an exec streams back: (an interactive one's id,) output chunks as they come, one result."""

from __future__ import annotations

import dataclasses
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


class KeptOutput:
    """A non-streamed exec's output, kept up to `cap` bytes per stream (None: all of it).

    Kept where the output is read, so that what goes past the cap never crosses to the caller;
    the result says `truncated` when anything was dropped, and still counts every byte written.
    """

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._kept = {"stdout": 0, "stderr": 0}
        self.dropped = False

    def add(self, chunk: OutputChunk) -> None:
        data = chunk.data
        if self.cap is not None:
            room = max(0, self.cap - self._kept[chunk.stream])
            if len(data) > room:
                data, self.dropped = data[:room], True
        if data:
            self._chunks[chunk.stream].append(data)
            self._kept[chunk.stream] += len(data)

    def finish(self, result: ExecResult) -> tuple[bytes, bytes, ExecResult]:
        """stdout, stderr and the result (marked truncated when this cap dropped output)."""
        if self.dropped and not result.truncated:
            result = dataclasses.replace(result, truncated=True)
        return b"".join(self._chunks["stdout"]), b"".join(self._chunks["stderr"]), result
