"""What every `cave` command shares without Ray: where the CLI's state lives, errors unwrapped.

Commands that talk to the HTTP API (`cave sandbox ls`, `cave keys ...`) and `cave --help` import
no Ray and no isolation code: they start in a fraction of the time, and work on a machine that
has neither (a laptop driving a remote API). Ray is imported by the commands that need it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cave.errors import CaveError, InvalidArgumentError


def cave_home() -> Path:
    """Where `cave up` keeps its cluster state: $CAVE_HOME, else ~/.cave."""
    return Path(os.environ.get("CAVE_HOME") or Path.home() / ".cave")


def as_cave_error(exc: BaseException) -> CaveError | None:
    """The CaveError behind exc, also when an actor raised it and Ray wrapped it; else None."""
    if isinstance(exc, CaveError):
        return exc
    ray_errors = sys.modules.get("ray.exceptions")  # loaded only if a command used Ray
    if ray_errors is not None and isinstance(exc, ray_errors.RayTaskError):
        return exc.cause if isinstance(exc.cause, CaveError) else None
    return None


def verb(
    group: argparse._SubParsersAction,
    name: str,
    text: str,
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A command or verb: main() calls `handler(args)` and prints its CaveErrors."""
    parser: argparse.ArgumentParser = group.add_parser(name, help=text, description=text)
    parser.set_defaults(handler=handler, parser=parser)
    return parser


def parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, str]:
    """`KEY=VALUE` arguments of a repeatable flag as a dict; InvalidArgumentError otherwise."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"{flag} expects KEY=VALUE, got {pair!r}")
        parsed[key] = value
    return parsed
