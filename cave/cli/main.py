"""`cave`: argument parsing, the up/down commands, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import ray

from actors.isolation.guarantees import Isolation
from actors.sandboxes import choose_node, directory, warm_pool
from cave.audit import cli as audit_cli
from cave.cli import keys_cmds, run, sandbox_cmds
from cave.cli.session import as_cave_error, cave_home, connected
from cluster.api import API_FILE, deploy_api, forget_api
from cluster.local import (
    ClusterInfo,
    driver_env,
    running_cluster,
    start_local_cluster,
    stop_local_cluster,
)
from config.settings import Settings, load_settings

ERROR_EXIT_CODE = 2
PREWARM_TIMEOUT_S = 60.0


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
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    up = _command(commands, "up", "start a local cluster and warm its sandbox pool", _up)
    up.add_argument("--num-cpus", type=int, metavar="N", help="CPUs Ray may use (default: all)")
    _command(commands, "down", "stop the local cluster and every sandbox in it", _down)
    sandbox = commands.add_parser("sandbox", help="work with sandboxes")
    verbs = sandbox.add_subparsers(metavar="VERB", required=True)
    run.add_arguments(_command(verbs, "run", "run one command in a fresh sandbox", run.run))
    sandbox_cmds.add_commands(verbs)
    keys = commands.add_parser("keys", help="manage API keys")
    keys_cmds.add_commands(keys.add_subparsers(metavar="VERB", required=True))
    audit = commands.add_parser("audit", help="check the audit log")
    audit_verbs = audit.add_subparsers(metavar="VERB", required=True)
    verify = _command(audit_verbs, "verify", audit_cli.VERIFY_HELP, audit_cli.verify_command)
    audit_cli.add_verify_arguments(verify)
    return parser


def _command(
    group: argparse._SubParsersAction,
    name: str,
    text: str,
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=text, description=text)
    parser.set_defaults(handler=handler, parser=parser)
    return parser


def _up(args: argparse.Namespace) -> int:
    settings = load_settings()  # a bad setting fails before anything starts
    started = time.monotonic()
    home = cave_home()
    was_running = running_cluster(home) is not None
    info = start_local_cluster(home, args.num_cpus)
    with connected(info.address):
        stats = _prewarm(settings)
        api = deploy_api(home, os.environ, Path.cwd())
    _print_up(info, stats, was_running, time.monotonic() - started)
    print(f"API: {api.url}  (docs {api.url}/docs, MCP {api.url}/mcp)")
    print(f"admin key: {api.admin_key}  (also in {home / API_FILE}; keep it secret)")
    return 0


def _prewarm(settings: Settings) -> dict[str, int]:
    """Create the head node's warm pool and wait, bounded, until its sandboxes are prepared.

    A node that cannot isolate (CAVE_ENV=production) fails `cave up` with the reason; a
    degraded one is said so on stderr.
    """
    pool = warm_pool(choose_node(), settings)
    ray.get(directory().ids.remote())  # started now, not by the first create
    isolation: Isolation = ray.get(pool.isolation_report.remote())
    if isolation.degraded:
        print(f"cave: warning: sandboxes are NOT isolated: {isolation.describe()}", file=sys.stderr)
    deadline = time.monotonic() + PREWARM_TIMEOUT_S
    while True:
        stats = cast(dict[str, int], ray.get(pool.stats.remote()))
        if stats["ready"] >= stats["size"] or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _print_up(info: ClusterInfo, stats: dict[str, int], was_running: bool, took_s: float) -> None:
    state = "already running" if was_running else f"started in {took_s:.1f} s"
    print(f"CAVE cluster {state} at {info.address} (pid {info.pid}, log {info.log})")
    print(f"warm pool: {stats['ready']} of {stats['size']} sandboxes ready")
    if stats["ready"] < stats["size"]:
        print(
            f"cave: warning: the warm pool is not full after {PREWARM_TIMEOUT_S:g} s; "
            f"see {info.log} and Ray's logs",
            file=sys.stderr,
        )
    variables = {"RAY_ADDRESS": info.address, **driver_env(info)}
    print("export " + " ".join(f"{k}={v}" for k, v in variables.items()))


def _down(args: argparse.Namespace) -> int:
    forget_api(cave_home())
    stopped = stop_local_cluster(cave_home())
    print("CAVE cluster stopped" if stopped else "no CAVE cluster was running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
