"""`cave audit verify`: output and exit status, through `python -m cluster.cli` in a subprocess."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli.main import main
from tests.audit.support import lines, write

ROOT = Path(__file__).resolve().parents[2]


def encoded(key: bytes) -> str:
    return base64.b64encode(key).decode().rstrip("=")


def cave(*args: str | Path, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CAVE_AUDIT_LOG_HMAC_KEY"}
    if key is not None:
        env["CAVE_AUDIT_LOG_HMAC_KEY"] = key
    command = [sys.executable, "-m", "cluster.cli", "audit", "verify", *map(str, args)]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_exit_codes(log_path: Path, key: bytes) -> None:
    write(log_path, key, 5)
    good = cave(log_path, key=encoded(key))
    assert (good.returncode, good.stdout) == (0, "OK: 5 lines\n")

    tampered = lines(log_path)
    tampered[2] = tampered[2].replace(b'"outcome":"ok"', b'"outcome":"denied"')
    log_path.write_bytes(b"".join(tampered))
    bad = cave(log_path, key=encoded(key))
    assert (bad.returncode, bad.stdout) == (1, f"FAIL: {log_path}:3: bad mac\n")

    no_key = cave(log_path, key=None)
    assert no_key.returncode == 2
    assert "cave: error: CAVE_AUDIT_LOG_HMAC_KEY is not set" in no_key.stderr

    malformed = cave(log_path, key="%%%")
    assert malformed.returncode == 2
    assert "CAVE_AUDIT_LOG_HMAC_KEY is not valid base64" in malformed.stderr


# The rest in-process: the same main(), without a second of start-up each.
def test_a_directory_of_rotated_files(
    log_path: Path, key: bytes, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAVE_AUDIT_LOG_HMAC_KEY", encoded(key))
    write(log_path, key, 40, max_bytes=2000)
    assert main(["audit", "verify", str(log_path.parent)]) == 0
    assert capsys.readouterr().out == "OK: 40 lines\n"
    assert main(["audit", "verify", "--expect-last-seq", "41", str(log_path.parent)]) == 1
    assert "expected at least 41" in capsys.readouterr().out


def test_a_missing_file_is_an_error(
    tmp_path: Path, key: bytes, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAVE_AUDIT_LOG_HMAC_KEY", encoded(key))
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such audit log file" in capsys.readouterr().err
    assert main(["audit", "verify"]) == 2  # FILE is required
