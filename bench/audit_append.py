"""Audit appends per second: signed and chained, next to unsigned JSONL with the same batching."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/audit_append.py`

from cave.audit import AuditEvent, AuditLogWriter, AuditSettings  # noqa: E402
from cave.audit.settings import FsyncPolicy  # noqa: E402

THREADS = int(os.environ.get("CAVE_BENCH_AUDIT_THREADS", "8"))
TASKS = int(os.environ.get("CAVE_BENCH_AUDIT_TASKS", "256"))
APPENDS = int(os.environ.get("CAVE_BENCH_AUDIT_APPENDS", "20000"))
ROUNDS = int(os.environ.get("CAVE_BENCH_AUDIT_ROUNDS", "3"))
SCRATCH = os.environ.get("CAVE_BENCH_AUDIT_DIR")  # default: the system's temp dir


class UnsignedJsonlWriter(AuditLogWriter):
    """The baseline: the same flusher, batches and fsyncs; plain JSON lines (no seq, prev, mac)."""

    def _line(self, fields: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode() + b"\n", ""


def event(i: int) -> AuditEvent:
    return AuditEvent(
        actor="key_3f9a2c",
        action="sandbox.exec",
        target=f"sbx_{i % 64:04d}",
        namespace="team-a",
        details={"argv": ["python", "-c", "print(1)"], "exit_code": 0, "duration_ms": 12.5},
    )


def from_threads(writer: AuditLogWriter, threads: int, total: int) -> float:
    def work() -> None:
        for i in range(total // threads):
            writer.append(event(i))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (total // threads * threads) / (time.perf_counter() - started)


def from_tasks(writer: AuditLogWriter, tasks: int, total: int) -> float:
    async def work() -> None:
        for i in range(total // tasks):
            await writer.append_async(event(i))

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(tasks)))
        return (total // tasks * tasks) / (time.perf_counter() - started)

    return asyncio.run(run())


def rate(
    kind: type[AuditLogWriter], fsync: FsyncPolicy, drive: Callable[[AuditLogWriter], float]
) -> float:
    scratch = Path(tempfile.mkdtemp(prefix="cave-audit-bench-", dir=SCRATCH))
    key = secrets.token_bytes(32)
    try:
        with kind(AuditSettings(path=scratch / "audit.jsonl", hmac_key=key, fsync=fsync)) as writer:
            for i in range(200):  # warm up the flusher, the file and the allocator
                writer.append(event(i))
            return drive(writer)
    finally:
        shutil.rmtree(scratch)


def fsync_latency_us(samples: int = 300) -> float:
    scratch = Path(tempfile.mkdtemp(prefix="cave-audit-bench-", dir=SCRATCH))
    fd = os.open(scratch / "probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        times = []
        for _ in range(samples):
            os.write(fd, b"x" * 300 + b"\n")
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e6
    finally:
        os.close(fd)
        shutil.rmtree(scratch)


def main() -> None:
    one = max(1000, APPENDS // 8)  # one thread waits for every fsync: fewer appends
    cases: list[tuple[str, FsyncPolicy, Callable[[AuditLogWriter], float]]] = [
        (f"{THREADS} threads, fsync=batch", "batch", lambda w: from_threads(w, THREADS, APPENDS)),
        ("1 thread, fsync=batch", "batch", lambda w: from_threads(w, 1, one)),
        (f"asyncio, {TASKS} tasks, fsync=batch", "batch", lambda w: from_tasks(w, TASKS, APPENDS)),
        ("1 thread, fsync=never (CPU only)", "never", lambda w: from_threads(w, 1, APPENDS)),
    ]
    print(f"fdatasync of a 300-byte append: median {fsync_latency_us():.0f} us")
    print(f"median of {ROUNDS} rounds, signed and unsigned interleaved")
    print(f"{'case':38s} {'signed/s':>10s} {'unsigned/s':>11s} {'ratio':>6s}")
    for name, fsync, drive in cases:
        signed, plain = [], []
        for _ in range(ROUNDS):
            signed.append(rate(AuditLogWriter, fsync, drive))
            plain.append(rate(UnsignedJsonlWriter, fsync, drive))
        s, p = statistics.median(signed), statistics.median(plain)
        print(f"{name:38s} {s:10,.0f} {p:11,.0f} {s / p:6.2f}")


if __name__ == "__main__":
    main()
