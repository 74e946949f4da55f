"""A writer process killed with SIGKILL mid-batch: what it acknowledged is on disk and verifies."""

from __future__ import annotations

import base64
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from cave.audit import AuditLogWriter, verify
from tests.audit.support import event, settings

ROOT = Path(__file__).resolve().parents[2]
ACKED_BEFORE_KILL = 300

# Four threads append without pause and print each seq that append() returned (= durable).
WRITER = """
import sys, threading
from cave.audit import AuditEvent, AuditLogWriter, load_audit_settings

writer = AuditLogWriter(load_audit_settings())

def work(n):
    i = 0
    while True:
        event = AuditEvent("key_%d" % n, "sandbox.exec", "sbx_%d" % i, details={"i": i})
        seq = writer.append(event)
        sys.stdout.write("%d\\n" % seq)
        sys.stdout.flush()
        i += 1

for n in range(4):
    threading.Thread(target=work, args=(n,), daemon=True).start()
threading.Event().wait()
"""


def acked_seqs(process: subprocess.Popen[bytes], count: int, timeout_s: float) -> list[int]:
    """Seqs the writer printed, read until `count` or the deadline."""
    assert process.stdout is not None
    deadline, buffer = time.monotonic() + timeout_s, b""
    while buffer.count(b"\n") < count and time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.1)[0]:
            buffer += os.read(process.stdout.fileno(), 65536)
    return [int(line) for line in buffer.split(b"\n")[:-1]]


def test_kill_9_mid_batch_then_a_new_writer_continues(log_path: Path, key: bytes) -> None:
    """Four threads keep a batch in flight at all times, so the kill lands in one.

    write(2) to a regular file is not torn by a signal, so the torn line a power cut leaves is
    made by hand in test_writer.py; what this checks is the chain and the restart after a crash.
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CAVE_AUDIT_LOG_ENABLED": "true",
        "CAVE_AUDIT_LOG_PATH": str(log_path),
        "CAVE_AUDIT_LOG_HMAC_KEY": base64.b64encode(key).decode().rstrip("="),
    }
    with subprocess.Popen(
        [sys.executable, "-c", WRITER], env=env, stdout=subprocess.PIPE
    ) as process:
        try:
            acked = acked_seqs(process, ACKED_BEFORE_KILL, timeout_s=20)
        finally:
            process.send_signal(signal.SIGKILL)
    assert len(acked) >= ACKED_BEFORE_KILL, "the writer did not get going"

    after_kill = verify([log_path], key)
    # Every complete line verifies; at worst the last one is torn by the kill.
    assert after_kill.ok or after_kill.reason == "torn last line", after_kill
    assert after_kill.lines_checked >= max(acked)  # nothing acknowledged was lost

    with AuditLogWriter(settings(log_path, key)) as writer:
        assert writer.append(event()) == after_kill.last_seq + 1
    assert str(verify([log_path], key)) == f"OK: {after_kill.last_seq + 1} lines"
