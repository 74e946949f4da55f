"""`cave sandbox create|ls|exec|stop|rm`: sandboxes of a running API, through `cave.client`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cave.errors import SandboxError
from cluster.cli.api_config import (
    add_json_flag,
    api_client,
    command,
    print_json,
    print_table,
    when,
)
from cluster.cli.base import ClientValues, parse_pairs
from cluster.cli.run import LIMIT_FLAGS, TIMEOUT_EXIT_CODE

if TYPE_CHECKING:  # the HTTP client loads when a command runs, not for `cave --help`
    from cave.client import ExecResult, SandboxInfo, SandboxState

HEADERS = ("ID", "NAME", "NAMESPACE", "STATE", "CREATED")


def add_commands(verbs: argparse._SubParsersAction) -> None:
    """Add the API's sandbox verbs to `cave sandbox`."""
    _add_create(command(verbs, "create", "create a sandbox and start it", _create))
    _add_ls(command(verbs, "ls", "list running sandboxes (--all: every state)", _ls))
    _add_exec(command(verbs, "exec", "run a command in a sandbox, output streamed", _exec))
    stop = command(verbs, "stop", "stop a sandbox: its processes and workspace go", _stop)
    stop.add_argument("sandbox_id", metavar="ID")
    add_json_flag(stop)
    remove = command(verbs, "rm", "delete a sandbox (stopping it first)", _remove)
    remove.add_argument("sandbox_id", metavar="ID")


def _add_create(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="", metavar="N", help="a name for people, not unique")
    for flag, (dest, kind, metavar, text) in LIMIT_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=text)
    parser.add_argument("--ttl-s", type=float, metavar="S", help="stop it this long after start")
    parser.add_argument(
        "--idle-timeout-s", type=float, metavar="S", help="stop it after this long unused"
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="a label (repeatable)"
    )
    parser.add_argument("--namespace", metavar="NS", help="where to create it (admin keys)")
    parser.add_argument("--pool", metavar="P", help="the node pool to place it in (cave.pool)")
    parser.add_argument(
        "--wait-s", type=float, metavar="S", help="when every node is full, wait S s for room"
    )
    parser.add_argument(
        "--no-start", action="store_false", dest="start", help="record it without starting it"
    )
    add_json_flag(parser)


def _add_ls(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--state",
        choices=ClientValues("SANDBOX_STATES"),
        metavar="STATE",
        help="only sandboxes in this state: %(choices)s",
    )
    which.add_argument("--all", action="store_true", help="sandboxes in every state")
    parser.add_argument("--name", metavar="N", help="only sandboxes with this name")
    parser.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="only with this label"
    )
    parser.add_argument("--namespace", metavar="NS", help="only this namespace (admin keys)")
    add_json_flag(parser)


def _add_exec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sandbox_id", metavar="ID")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment (repeatable)"
    )
    parser.add_argument("--cwd", metavar="DIR", help="working directory inside the sandbox")
    parser.add_argument("--timeout-s", type=float, metavar="S", help="kill the command after S s")
    parser.add_argument(
        "-i", "--stdin", action="store_true", help="send this process's stdin to the command"
    )
    parser.add_argument(
        "command", nargs="+", metavar="CMD", help="after --: the command and its arguments"
    )


def _create(args: argparse.Namespace) -> int:
    limits = {dest: getattr(args, dest) for dest, *_ in LIMIT_FLAGS.values()}
    labels = parse_pairs(args.label, "--label")
    with api_client(args) as client:
        sandbox = client.sandboxes.create(
            name=args.name,
            limits=limits,
            labels=labels,
            ttl_s=args.ttl_s,
            idle_timeout_s=args.idle_timeout_s,
            namespace=args.namespace,
            start=args.start,
            pool=args.pool,
            wait_s=args.wait_s,
        )
    if args.as_json:
        print_json(sandbox.info.model_dump(mode="json"))
    else:
        _print_sandboxes([sandbox.info])
        if sandbox.api_key:
            print(f"sandbox api key (shown only now): {sandbox.api_key}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    state: SandboxState | None = None if args.all else args.state or "running"
    labels = parse_pairs(args.label, "--label")
    with api_client(args) as client:
        found = list(
            client.sandboxes.iter_all(
                state=state, name=args.name, labels=labels, namespace=args.namespace
            )
        )
    if args.as_json:
        print_json([info.model_dump(mode="json") for info in found])
    else:
        _print_sandboxes(found)
    return 0


def _exec(args: argparse.Namespace) -> int:
    """Output goes to our stdout and stderr as it comes; the command's exit code is ours."""
    from cave.client import OutputChunk

    env = parse_pairs(args.env, "--env")
    stdin = sys.stdin.read() if args.stdin else None
    with api_client(args) as client:
        events = client.sandboxes.exec_stream(
            args.sandbox_id,
            args.command,
            env=env,
            cwd=args.cwd,
            stdin=stdin,
            timeout_s=args.timeout_s,
        )
        for event in events:
            if isinstance(event, OutputChunk):
                sink = sys.stdout if event.stream == "stdout" else sys.stderr
                sink.write(event.data)
                sink.flush()
            else:
                return _exit_code(event, args.timeout_s)
    raise SandboxError("the API ended the command's stream without a result")


def _exit_code(result: ExecResult, timeout_s: float | None) -> int:
    """The command's own code; like `cave sandbox run`: 124 on timeout, a note on stderr."""
    if result.truncated:
        print("cave: output was truncated", file=sys.stderr)
    if result.timed_out:
        after = f" after {timeout_s:g} s" if timeout_s else ""
        print(f"cave: command timed out{after}", file=sys.stderr)
        return TIMEOUT_EXIT_CODE
    if result.oom_killed:
        print("cave: command was killed: out of memory", file=sys.stderr)
    return result.exit_code


def _stop(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        sandbox = client.sandboxes.stop(args.sandbox_id)
    if args.as_json:
        print_json(sandbox.info.model_dump(mode="json"))
    else:
        print(sandbox.id)
    return 0


def _remove(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        client.sandboxes.delete(args.sandbox_id)
    print(args.sandbox_id)
    return 0


def _print_sandboxes(sandboxes: list[SandboxInfo]) -> None:
    rows = [(s.id, s.name or "-", s.namespace, s.state, when(s.created_at)) for s in sandboxes]
    print_table(HEADERS, rows)
