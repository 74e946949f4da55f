"""`cave sandbox run`: one command in a fresh sandbox, output streamed, its exit code returned."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from cave.errors import SandboxError
from cluster.cli.base import as_cave_error, parse_pairs

if TYPE_CHECKING:  # Ray, the sandbox code and the settings load when a command runs, not for
    # `cave --help`
    from actors.isolation.results import ExecResult
    from actors.sandboxes import SandboxHandle
    from config.settings import LimitOverrides, SandboxLimits

TIMEOUT_EXIT_CODE = 124
LIMIT_FLAGS = {  # flag -> (LimitOverrides field, type, metavar, help)
    "--memory-mb": ("memory_mb", int, "N", "memory limit in MiB"),
    "--pids": ("pids", int, "N", "most processes and threads at once"),
    "--timeout-s": ("timeout_s", float, "S", "wall-clock seconds before the command is killed"),
    "--disk-mb": ("disk_mb", int, "N", "workspace size in MiB"),
    "--cpu": ("cpu", float, "C", "CPUs' worth of time, may be fractional"),
    "--output-bytes": ("output_bytes", int, "N", "bytes of stdout and of stderr kept"),
}


@dataclass(frozen=True)
class RunRequest:
    argv: list[str]
    overrides: LimitOverrides
    env: dict[str, str]
    cwd: str | None
    stdin: bytes | None
    as_json: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (dest, kind, metavar, text) in LIMIT_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=text)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="environment variable for the command (repeatable)",
    )
    parser.add_argument("--cwd", metavar="DIR", help="working directory inside the sandbox")
    parser.add_argument(
        "--json",
        action="store_true",
        dest="as_json",
        help="print one JSON object with the result and output, nothing else",
    )
    parser.add_argument("command", nargs="*", metavar="-- CMD ARGS", help="the command to run")


def run(args: argparse.Namespace) -> int:
    """Parse and check everything first, so bad input fails before a sandbox exists."""
    from actors.sandboxes import create_sandbox
    from cluster.cli.session import connected
    from config.settings import load_settings, parse_overrides, resolve_limits

    given = {dest: getattr(args, dest) for dest, *_ in LIMIT_FLAGS.values()}
    overrides, env = parse_overrides(**given), parse_pairs(args.env, "--env")
    settings = load_settings()
    limits = resolve_limits(overrides, settings)
    request = RunRequest(args.command, overrides, env, args.cwd, _read_stdin(), args.as_json)
    with connected():
        handle = create_sandbox(settings, request.overrides)
        try:
            result = _execute(handle, request)
        finally:
            _stop(handle)
    return _report(result, limits, request.as_json)


def _read_stdin() -> bytes | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.buffer.read()


@dataclass
class _Outcome:
    result: ExecResult
    stdout: bytes
    stderr: bytes


def _execute(handle: SandboxHandle, request: RunRequest) -> _Outcome:
    """Stream output to our stdout/stderr as it comes, or collect it for --json."""
    from actors.isolation.results import ExecResult, OutputChunk

    sinks: dict[str, BinaryIO] = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    kept: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    items = handle.exec_stream(
        request.argv,
        env=request.env,
        cwd=request.cwd,
        stdin=request.stdin,
        timeout_s=request.overrides.timeout_s,
    )
    for item in items:
        if isinstance(item, ExecResult):
            return _Outcome(item, b"".join(kept["stdout"]), b"".join(kept["stderr"]))
        assert isinstance(item, OutputChunk)
        if request.as_json:
            kept[item.stream].append(item.data)
        else:
            sinks[item.stream].write(item.data)
            sinks[item.stream].flush()
    raise SandboxError("the sandbox ended the command without a result")


def _stop(handle: SandboxHandle) -> None:
    try:
        handle.stop()
    except Exception as exc:  # the command's outcome matters more; say what was left behind
        error = as_cave_error(exc) or exc
        print(f"cave: warning: could not stop sandbox {handle.id}: {error}", file=sys.stderr)


def _report(outcome: _Outcome, limits: SandboxLimits, as_json: bool) -> int:
    result = outcome.result
    code = TIMEOUT_EXIT_CODE if result.timed_out else result.exit_code
    if as_json:
        print(
            json.dumps(
                {
                    "exit_code": code,
                    "timed_out": result.timed_out,
                    "oom_killed": result.oom_killed,
                    "truncated": result.truncated,
                    "duration_ms": round(result.duration_ms, 3),
                    "stdout": outcome.stdout.decode("utf-8", errors="replace"),
                    "stderr": outcome.stderr.decode("utf-8", errors="replace"),
                }
            )
        )
        return code
    if result.truncated:
        print(
            f"cave: output was truncated to {limits.output_bytes} bytes per stream", file=sys.stderr
        )
    if result.timed_out:
        print(f"cave: command timed out after {limits.timeout_s:g} s", file=sys.stderr)
    elif result.oom_killed:
        print("cave: command was killed: out of memory", file=sys.stderr)
    return code
