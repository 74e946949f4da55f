"""The files of one audit log: rotated names, their chain order, and the live file's tail."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cave.audit import chain
from cave.errors import AuditLogError, NotFoundError

log = logging.getLogger("cave.audit")

_RANGE = re.compile(r"\.(\d+)-(\d+)$")
_CHUNK = 64 * 1024


def rotated_name(path: Path, first_seq: int, last_seq: int) -> Path:
    """Where the live file goes when it is rotated: `audit.jsonl.<first>-<last>`."""
    # Zero-padded so that a shell glob lists them in chain order.
    return path.with_name(f"{path.name}.{first_seq:012d}-{last_seq:012d}")


def _split(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(name of the live file, seq range) of a log file; range None for the live file itself."""
    match = _RANGE.search(path.name)
    if match is None:
        return path.name, None
    return path.name[: match.start()], (int(match[1]), int(match[2]))


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the live file `path`, oldest first."""
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.iterdir() if _split(p) != (path.name, None)]
    return sorted((p for p in found if _split(p)[0] == path.name), key=_chain_position)


def log_files(paths: Sequence[Path]) -> list[Path]:
    """The files to verify, in chain order.

    A directory stands for the `*.jsonl` logs in it and their rotated files. The files of one log
    (`audit.jsonl`, `audit.jsonl.<first>-<last>`) are put in chain order, rotated ones by their seq
    range and the live file last; separate logs keep the order they were given in.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if _is_log_file(p)))
        elif path.is_file():
            files.append(path)
        else:
            raise NotFoundError(f"{path}: no such audit log file")
    groups: dict[tuple[Path, str], list[Path]] = {}
    for file in files:
        groups.setdefault((file.parent, _split(file)[0]), []).append(file)
    return [file for group in groups.values() for file in sorted(group, key=_chain_position)]


def _is_log_file(path: Path) -> bool:
    return path.is_file() and _split(path)[0].endswith(".jsonl")


def _chain_position(path: Path) -> tuple[int, int, int]:
    seq_range = _split(path)[1]
    return (1, 0, 0) if seq_range is None else (0, *seq_range)


@dataclass(frozen=True)
class Tail:
    """Where the chain stands: the last seq and MAC written, and the live file's first seq."""

    seq: int = 0
    mac: str = chain.GENESIS
    first_seq: int | None = None  # None: the live file is empty
    size: int = 0


def recover(fd: int, path: Path, signer: chain.Signer) -> Tail:
    """Read the live file's tail (opened read-write as `fd`), dropping a line torn by a crash."""
    size = os.fstat(fd).st_size
    if size and _read(fd, size - 1, 1) != b"\n":
        size = _truncate(fd, path, _line_start(fd, size), "an incomplete last line")
    last = _last_record(fd, size)
    if size and last is None:
        size = _truncate(fd, path, _line_start(fd, size - 1), "a last line that is not JSON")
        last = _last_record(fd, size)
        if size and last is None:
            raise AuditLogError(
                f"{path}: the log is damaged before its last line; check it with "
                "`cave audit verify` before appending to it"
            )
    if last is None:
        return _rotated_tail(path, signer)
    _warn_if_other_key(last, signer, path)
    first = chain.parse(_read(fd, 0, _line_end(fd, 0, size)))
    return Tail(last["seq"], last["mac"], first["seq"] if first else 0, size)


def _rotated_tail(path: Path, signer: chain.Signer) -> Tail:
    """An empty live file continues the chain of the newest rotated file, if there is one."""
    rotated = rotated_files(path)
    if not rotated:
        return Tail()
    fd = os.open(rotated[-1], os.O_RDONLY)
    try:
        last = _last_record(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if last is None:
        raise AuditLogError(f"{rotated[-1]}: cannot continue the chain: its last line is damaged")
    _warn_if_other_key(last, signer, rotated[-1])
    return Tail(last["seq"], last["mac"])


def _warn_if_other_key(record: dict[str, Any], signer: chain.Signer, path: Path) -> None:
    if not signer.matches(record):
        log.warning(
            "%s: the last line was not signed with this key (was the key changed?); the chain "
            "goes on, but verifying the whole log now needs both keys",
            path,
        )


def _last_record(fd: int, size: int) -> dict[str, Any] | None:
    """The last (complete) line of the first `size` bytes as an audit record, else None."""
    if size == 0:
        return None
    start = _line_start(fd, size - 1)
    record = chain.parse(_read(fd, start, size - start))
    return record if record is not None and chain.is_audit_line(record) else None


def _line_start(fd: int, end: int) -> int:
    """Offset just after the last newline before `end` (0 when there is none)."""
    position = end
    while position > 0:
        start = max(0, position - _CHUNK)
        newline = _read(fd, start, position - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _line_end(fd: int, start: int, size: int) -> int:
    """Length of the line starting at `start`, its newline included."""
    position = start
    while position < size:
        newline = _read(fd, position, min(_CHUNK, size - position)).find(b"\n")
        if newline >= 0:
            return position + newline + 1 - start
        position += _CHUNK
    return size - start


def _read(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def _truncate(fd: int, path: Path, size: int, what: str) -> int:
    log.warning("%s: dropping %s (a crash while writing) at byte %d", path, what, size)
    os.ftruncate(fd, size)
    os.fsync(fd)
    return size
