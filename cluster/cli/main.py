"""`cave`: argument parsing, and the one place errors become exit codes.

Nothing here imports Ray: `cave --help` and the HTTP API's commands never load it; `cave up`,
`cave down` and `cave sandbox run` load it when they run (cluster/cli/local_cmds.py, run.py)."""

from __future__ import annotations

import argparse
import sys

from cave import __version__
from cluster.cli import audit_cmds, completion, keys_cmds, run, sandbox_cmds
from cluster.cli.base import as_cave_error, verb

ERROR_EXIT_CODE = 2


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.handler is run.run and not args.command:
            args.parser.error("missing command after `--`")
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else ERROR_EXIT_CODE
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        error = as_cave_error(exc)
        if error is None:
            raise
        print(f"cave: error: {error.message}", file=sys.stderr)
        return ERROR_EXIT_CODE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cave", description="CAVE: isolated code sandboxes")
    parser.add_argument("--version", action="version", version=f"cave {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    up = verb(commands, "up", "start a local cluster and warm its sandbox pool", _up)
    up.add_argument("--num-cpus", type=int, metavar="N", help="CPUs Ray may use (default: all)")
    verb(commands, "down", "stop the local cluster and every sandbox in it", _down)
    sandbox = commands.add_parser("sandbox", help="work with sandboxes")
    verbs = sandbox.add_subparsers(metavar="VERB", required=True)
    run.add_arguments(verb(verbs, "run", "run one command in a fresh sandbox", run.run))
    sandbox_cmds.add_commands(verbs)
    keys = commands.add_parser("keys", help="manage API keys")
    keys_cmds.add_commands(keys.add_subparsers(metavar="VERB", required=True))
    audit = commands.add_parser("audit", help="check the audit log")
    audit_verbs = audit.add_subparsers(metavar="VERB", required=True)
    verify = verb(audit_verbs, "verify", audit_cmds.VERIFY_HELP, audit_cmds.verify_command)
    audit_cmds.add_verify_arguments(verify)
    shells = verb(commands, "completion", "print a shell completion script", _completion)
    shells.add_argument("shell", choices=completion.SHELLS, help="source <(cave completion bash)")
    return parser


def _completion(args: argparse.Namespace) -> int:
    print(completion.script(build_parser(), args.shell), end="")
    return 0


def _up(args: argparse.Namespace) -> int:
    from cluster.cli import local_cmds  # Ray, the cluster and the sandbox code: only here

    return local_cmds.up(args)


def _down(args: argparse.Namespace) -> int:
    from cluster.cli import local_cmds

    return local_cmds.down(args)


if __name__ == "__main__":
    sys.exit(main())
