"""verify() on tampered logs: each change is found, at the right line, for the right reason."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from cave.audit import verify
from cave.audit.chain import GENESIS, Signer
from cave.audit.files import log_files
from cave.errors import NotFoundError
from tests.audit.support import event, lines, records, write

BROKEN_CHAIN = "broken chain (prev does not match)"


@pytest.fixture
def log(log_path: Path, key: bytes) -> Path:
    write(log_path, key, 10)
    return log_path


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


def failure(path: Path, key: bytes, **options: object) -> tuple[int | None, str | None]:
    result = verify([path], key, **options)  # type: ignore[arg-type]
    assert not result.ok
    assert result.file == path
    return result.line, result.reason


def test_an_untouched_log_passes(log: Path, key: bytes) -> None:
    result = verify([log], key)
    assert (result.ok, result.lines_checked, result.last_seq) == (True, 10, 10)
    assert result.last_mac == records(log)[-1]["mac"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("target", "sbx_9999"), ("outcome", "denied"), ("details", {}), ("seq", 40), ("actor", "x")],
)
def test_an_edited_field_is_a_bad_mac(log: Path, key: bytes, field: str, value: object) -> None:
    all_lines = lines(log)
    record = json.loads(all_lines[3])
    record[field] = value
    all_lines[3] = json.dumps(record, ensure_ascii=False).encode() + b"\n"
    rewrite(log, all_lines)
    assert failure(log, key) == (4, "bad mac")


def test_a_deleted_line_breaks_the_chain(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    del all_lines[4]
    rewrite(log, all_lines)
    assert failure(log, key) == (5, BROKEN_CHAIN)


def test_a_deleted_first_line_breaks_the_chain(log: Path, key: bytes) -> None:
    rewrite(log, lines(log)[1:])
    assert failure(log, key) == (1, BROKEN_CHAIN)


def test_swapped_lines_break_the_chain(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    all_lines[3], all_lines[4] = all_lines[4], all_lines[3]
    rewrite(log, all_lines)
    assert failure(log, key) == (4, BROKEN_CHAIN)


def test_an_inserted_line_forged_with_another_key_is_a_bad_mac(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    before = json.loads(all_lines[4])
    # Right place in the chain, plausible content, but the forger does not have the key.
    forged, _ = Signer(secrets.token_bytes(32)).seal(
        event(7, action="key.revoke").fields(), before["seq"] + 1, before["mac"]
    )
    rewrite(log, [*all_lines[:5], forged, *all_lines[5:]])
    assert failure(log, key) == (6, "bad mac")


def test_a_replayed_genuine_line_breaks_the_chain(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    rewrite(log, [*all_lines[:6], all_lines[2], *all_lines[6:]])
    assert failure(log, key) == (7, BROKEN_CHAIN)


def test_a_cut_off_end_needs_an_anchor(log: Path, key: bytes) -> None:
    """Lines removed at the END leave a valid prefix: only a seq recorded elsewhere shows them."""
    rewrite(log, lines(log)[:8])
    assert str(verify([log], key)) == "OK: 8 lines"
    line, reason = failure(log, key, expect_last_seq=10)
    assert line == 8
    assert reason == ("the log ends at seq 8, expected at least 10 (lines are missing at the end)")
    assert verify([log], key, expect_last_seq=8).ok


def test_a_torn_last_line(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    rewrite(log, [*all_lines[:9], all_lines[9][:40]])
    result = verify([log], key)
    assert (result.line, result.reason, result.lines_checked) == (10, "torn last line", 9)


def test_a_line_that_is_not_json(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    all_lines[2] = b"{oops\n"
    rewrite(log, all_lines)
    assert failure(log, key) == (3, "not JSON")


def test_json_that_is_not_an_audit_line(log: Path, key: bytes) -> None:
    all_lines = lines(log)
    all_lines[2] = b'{"action":"sandbox.create"}\n'
    rewrite(log, all_lines)
    assert failure(log, key) == (3, "not an audit line (no seq, prev or mac)")


def test_a_sequence_gap(log_path: Path, key: bytes) -> None:
    """Only someone with the key can make one (a writer bug): seq 3 follows seq 1."""
    signer = Signer(key)
    first, mac = signer.seal(event(0).fields(), 1, GENESIS)
    second, _ = signer.seal(event(1).fields(), 3, mac)
    log_path.parent.mkdir(parents=True)
    rewrite(log_path, [first, second])
    assert failure(log_path, key) == (2, "sequence gap (expected seq 2, found 3)")


def test_the_wrong_key_fails_at_the_first_line(log: Path) -> None:
    assert failure(log, secrets.token_bytes(32)) == (1, "bad mac")


def test_files_must_come_in_chain_order(log_path: Path, key: bytes) -> None:
    write(log_path, key, 30, max_bytes=1500)
    ordered = log_files([log_path.parent])
    assert len(ordered) >= 3
    assert verify(ordered, key).ok
    shuffled = [ordered[-1], *ordered[:-1]]
    assert verify(shuffled, key).reason == BROKEN_CHAIN
    assert log_files(shuffled) == ordered  # files of one log are put in chain order


def test_a_missing_file_is_an_error(tmp_path: Path, key: bytes) -> None:
    with pytest.raises(NotFoundError):
        verify([tmp_path / "nope.jsonl"], key)
    with pytest.raises(NotFoundError):
        log_files([tmp_path / "nope.jsonl"])


def test_nothing_to_check_is_ok_unless_an_anchor_says_otherwise(tmp_path: Path, key: bytes) -> None:
    empty = tmp_path / "audit.jsonl"
    empty.touch()
    assert str(verify([empty], key)) == "OK: 0 lines"
    assert not verify([empty], key, expect_last_seq=1).ok
