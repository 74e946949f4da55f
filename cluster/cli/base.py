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
from functools import cached_property
from pathlib import Path
from typing import overload

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


class ClientValues(Sequence[str]):
    """The strings of `cave.client.<name>` (SCOPES, SANDBOX_STATES), imported when argparse first
    checks or lists one, so that building the parser (`cave --help`) imports no HTTP client.
    An argument using it needs a metavar: argparse lists choices into the usage line otherwise."""

    def __init__(self, name: str) -> None:
        self._name = name

    @cached_property
    def _values(self) -> tuple[str, ...]:
        import cave.client

        return tuple(getattr(cave.client, self._name))

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)
