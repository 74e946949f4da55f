"""`verify`: check the MACs, the chain and the sequence of audit log files."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cave.audit import chain
from cave.errors import AuditLogError, NotFoundError

START = (0, chain.GENESIS)  # (seq, mac) that the first line of a whole log follows


@dataclass(frozen=True)
class VerifyResult:
    """The outcome; on failure the first bad line (1-based, per file) and why."""

    ok: bool
    lines_checked: int  # lines that passed
    last_seq: int = 0  # of the last line that passed: an anchor for the next check
    last_mac: str = chain.GENESIS
    file: Path | None = None
    line: int | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.lines_checked} lines"
        return f"FAIL: {self.file}:{self.line}: {self.reason}"


class _Chain:
    """Where the check stands; seq and mac are None until the first line when not anchored."""

    def __init__(self, after: tuple[int, str] | None) -> None:
        self.seq: int | None = None if after is None else after[0]
        self.mac: str | None = None if after is None else after[1]
        self.checked = 0

    def check(self, line: bytes, signer: chain.Signer) -> str | None:
        """Why `line` does not continue the chain, or None (and the chain moves on)."""
        if not line.endswith(b"\n"):
            return "torn last line"
        record = chain.parse(line)
        if record is None:
            return "not JSON"
        if not chain.is_audit_line(record):
            return "not an audit line (no seq, prev or mac)"
        if not signer.matches(record):
            return "bad mac"
        if self.mac is not None and record["prev"] != self.mac:
            return "broken chain (prev does not match)"
        if self.seq is not None and record["seq"] != self.seq + 1:
            return f"sequence gap (expected seq {self.seq + 1}, found {record['seq']})"
        self.seq, self.mac = record["seq"], record["mac"]
        self.checked += 1
        return None

    def passed(self) -> VerifyResult:
        return VerifyResult(True, self.checked, self.seq or 0, self.mac or chain.GENESIS)

    def failed(self, file: Path | None, line: int, reason: str) -> VerifyResult:
        seq, mac = self.seq or 0, self.mac or chain.GENESIS
        return VerifyResult(False, self.checked, seq, mac, file, line, reason)


def verify(
    paths: Sequence[Path],
    key: bytes,
    *,
    expect_last_seq: int | None = None,
    after: tuple[int, str] | None = START,
) -> VerifyResult:
    """Check `paths`, taken in the order given, as one chain signed with `key`.

    The first line must follow `after` (default: the start of a log; None trusts the first line,
    for a log whose older files were archived). Lines cut off the END of a log leave a valid
    prefix: only an anchor kept elsewhere shows them, hence `expect_last_seq` (the log must reach
    at least that seq; `AuditLogWriter.head` gives it).
    """
    state, signer = _Chain(after), chain.Signer(key)
    line_count = 0
    for path in paths:
        line_count = 0
        for line_count, line in enumerate(_lines(path), 1):
            reason = state.check(line, signer)
            if reason is not None:
                return state.failed(path, line_count, reason)
    if expect_last_seq is not None and (state.seq or 0) < expect_last_seq:
        reason = (
            f"the log ends at seq {state.seq or 0}, expected at least {expect_last_seq} "
            "(lines are missing at the end)"
        )
        return state.failed(paths[-1] if paths else None, line_count, reason)
    return state.passed()


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of `path`, each with its newline (none on a torn last one); split on b"\\n"."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such audit log file") from None
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot read the audit log: {exc.strerror or exc}") from None
    with handle:
        yield from handle
