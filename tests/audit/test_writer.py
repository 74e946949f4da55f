"""AuditLogWriter on real files: line format, chain, rotation, restart, torn tails, threads."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import pytest

from cave.audit import AuditLogWriter, AuditSettings, open_audit_log, verify
from cave.audit.chain import GENESIS, Signer, canonical
from cave.audit.files import log_files, rotated_files
from cave.errors import CaveError, ConfigError, ConflictError, InvalidArgumentError
from tests.audit.support import event, lines, records, settings, write


def test_round_trip(log_path: Path, key: bytes) -> None:
    assert write(log_path, key, 3) == [1, 2, 3]
    first, second, third = records(log_path)
    assert first["prev"] == GENESIS
    assert (second["prev"], third["prev"]) == (first["mac"], second["mac"])
    assert first["details"] == {"argv": ["echo", "grüße"], "exit_code": 0, "i": 0}
    assert (first["actor"], first["action"], first["target"]) == (
        "key_abc123",
        "sandbox.exec",
        "sbx_0000",
    )
    assert first["namespace"] == "team-a" and first["outcome"] == "ok" and first["v"] == 1
    assert len(first["id"]) == 32 and first["ts"].endswith("Z")
    assert str(verify([log_path], key)) == "OK: 3 lines"


def test_line_is_canonical_json_with_the_mac_last(log_path: Path, key: bytes) -> None:
    write(log_path, key, 1)
    line = lines(log_path)[0]
    record = json.loads(line)
    mac = record.pop("mac")
    assert line == canonical(record)[:-1] + b',"mac":"' + mac.encode() + b'"}\n'
    assert "grüße".encode() in line  # UTF-8, not \\u escapes
    assert Signer(key).mac(canonical(record)) == mac


def test_head_is_the_last_line(log_path: Path, key: bytes) -> None:
    with AuditLogWriter(settings(log_path, key)) as writer:
        writer.append(event())
        writer.append(event())
        head = writer.head
    last = records(log_path)[-1]
    assert head == (last["seq"], last["mac"]) == (2, last["mac"])


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_every_fsync_policy_writes_a_valid_chain(log_path: Path, key: bytes, fsync: str) -> None:
    assert write(log_path, key, 20, fsync=fsync) == list(range(1, 21))
    assert verify([log_path], key).ok


def test_rotation_keeps_the_chain_across_files(log_path: Path, key: bytes) -> None:
    write(log_path, key, 60, max_bytes=2000)
    rotated = rotated_files(log_path)
    assert len(rotated) >= 3
    ranges = [tuple(int(n) for n in p.name.rsplit(".", 1)[1].split("-")) for p in rotated]
    assert ranges[0][0] == 1
    assert all(after[0] == before[1] + 1 for before, after in zip(ranges, ranges[1:], strict=False))
    assert all(p.stat().st_size >= 2000 for p in rotated)
    files = log_files([log_path.parent])
    assert files == [*rotated, log_path]
    assert str(verify(files, key)) == "OK: 60 lines"
    # A later file alone does not start the chain; anchored on the one before, it does.
    alone = verify(rotated[1:2], key)
    assert (alone.ok, alone.line, alone.reason) == (False, 1, "broken chain (prev does not match)")
    before = verify(rotated[:1], key)
    assert verify(rotated[1:2], key, after=(before.last_seq, before.last_mac)).ok
    assert verify(rotated[1:], key, after=None).ok


def test_restart_continues_the_chain(log_path: Path, key: bytes) -> None:
    assert write(log_path, key, 5) == [1, 2, 3, 4, 5]
    assert write(log_path, key, 5) == [6, 7, 8, 9, 10]
    assert str(verify([log_path], key)) == "OK: 10 lines"


def test_restart_after_rotation_continues_from_the_rotated_file(log_path: Path, key: bytes) -> None:
    write(log_path, key, 3, max_bytes=1)  # every line fills a file: the live file is left empty
    assert log_path.stat().st_size == 0
    assert write(log_path, key, 1, max_bytes=1) == [4]
    assert str(verify(log_files([log_path.parent]), key)) == "OK: 4 lines"


def test_a_torn_last_line_is_dropped_on_start(
    log_path: Path, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    write(log_path, key, 5)
    with log_path.open("ab") as handle:
        handle.write(lines(log_path)[-1][:57])  # a crash in the middle of a write
    torn = verify([log_path], key)
    assert (torn.ok, torn.lines_checked, torn.line, torn.reason) == (False, 5, 6, "torn last line")
    with caplog.at_level(logging.WARNING, logger="cave.audit"):
        assert write(log_path, key, 1) == [6]
    assert "incomplete last line" in caplog.text
    assert str(verify([log_path], key)) == "OK: 6 lines"


def test_a_last_line_that_is_not_json_is_dropped_on_start(log_path: Path, key: bytes) -> None:
    write(log_path, key, 3)
    with log_path.open("ab") as handle:
        handle.write(b"\0\0\0\0\n")  # blocks allocated but never written before a power cut
    assert write(log_path, key, 1) == [4]
    assert verify([log_path], key).ok


def test_damage_before_the_last_line_refuses_to_append(log_path: Path, key: bytes) -> None:
    write(log_path, key, 3)
    with log_path.open("ab") as handle:
        handle.write(b"garbage\nmore garbage\n")
    with pytest.raises(CaveError, match="damaged"):
        write(log_path, key, 1)


def test_concurrent_appends_from_8_threads(log_path: Path, key: bytes) -> None:
    seqs: list[int] = []
    with AuditLogWriter(settings(log_path, key)) as writer:

        def work(thread: int) -> None:
            for i in range(150):
                seqs.append(writer.append(event(i, actor=f"key_{thread}")))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(seqs) == list(range(1, 1201))
    assert [record["seq"] for record in records(log_path)] == list(range(1, 1201))
    assert str(verify([log_path], key)) == "OK: 1200 lines"


def test_concurrent_async_appends(log_path: Path, key: bytes) -> None:
    async def main() -> list[int]:
        with AuditLogWriter(settings(log_path, key)) as writer:
            return list(await asyncio.gather(*(writer.append_async(event(i)) for i in range(300))))

    assert sorted(asyncio.run(main())) == list(range(1, 301))
    assert verify([log_path], key).ok


def test_one_writer_per_log(log_path: Path, key: bytes) -> None:
    with AuditLogWriter(settings(log_path, key)), pytest.raises(ConflictError):
        AuditLogWriter(settings(log_path, key))
    AuditLogWriter(settings(log_path, key)).close()  # the lock went with the first writer


def test_append_after_close_is_refused(log_path: Path, key: bytes) -> None:
    writer = AuditLogWriter(settings(log_path, key))
    writer.close()
    writer.close()
    with pytest.raises(CaveError, match="closed"):
        writer.append(event())


def test_details_that_are_not_json_are_refused_and_the_chain_goes_on(
    log_path: Path, key: bytes
) -> None:
    with AuditLogWriter(settings(log_path, key)) as writer:
        writer.append(event())
        with pytest.raises(InvalidArgumentError, match="JSON"):
            writer.append(event(details={"tags": {"a", "b"}}))
        with pytest.raises(InvalidArgumentError, match="JSON"):
            writer.append(event(details={"ratio": float("nan")}))
        assert writer.append(event()) == 2
    assert verify([log_path], key).ok


def test_scrub_masks_details_and_target(log_path: Path, key: bytes) -> None:
    with AuditLogWriter(settings(log_path, key, scrub=True)) as writer:
        writer.append(
            event(target="alice@example.com", details={"client": "10.1.2.3", "password": "x"})
        )
    record = records(log_path)[0]
    assert record["target"] == "***@example.com"
    assert record["details"] == {"client": "***", "password": "***"}
    assert verify([log_path], key).ok


def test_a_writer_needs_a_key(log_path: Path) -> None:
    with pytest.raises(ConfigError, match="CAVE_AUDIT_LOG_HMAC_KEY"):
        AuditLogWriter(AuditSettings(path=log_path))


def test_open_audit_log_only_when_enabled(log_path: Path, key: bytes) -> None:
    assert open_audit_log(AuditSettings(enabled=False, path=log_path, hmac_key=key)) is None
    writer = open_audit_log(settings(log_path, key))
    assert writer is not None
    writer.close()


def test_a_changed_key_is_warned_about(
    log_path: Path, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    write(log_path, key, 2)
    with caplog.at_level(logging.WARNING, logger="cave.audit"):
        assert write(log_path, bytes(32), 1) == [3]  # the chain goes on all the same
    assert "not signed with this key" in caplog.text
