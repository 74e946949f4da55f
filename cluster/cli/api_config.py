"""What the API commands share: where the API is and its key, a client, tables and JSON.

The URL and key come from `--url`/`--api-key`, else $CAVE_API_URL/$CAVE_API_KEY, else the
`api.json` that `cave up` writes in the CAVE home ({"url": ..., "admin_key": ...}).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cave.errors import CaveError, ConfigError
from cluster.cli.base import cave_home, verb

if TYPE_CHECKING:  # the HTTP client loads when a command runs, not for `cave --help`
    from cave.client import Cave, CaveAPIError

URL_ENV, KEY_ENV = "CAVE_API_URL", "CAVE_API_KEY"  # the client's (tests/api/test_cli_api checks)

API_FILE = "api.json"
NO_API = f"no CAVE API known: pass --url, set ${URL_ENV}, or start one with `cave up`"
NO_KEY = f"no API key: pass --api-key or set ${KEY_ENV}"


@dataclass(frozen=True)
class ApiConfig:
    url: str
    api_key: str


def api_file() -> Path:
    return cave_home() / API_FILE


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", metavar="URL", help=f"the CAVE API (default: ${URL_ENV})")
    parser.add_argument("--api-key", metavar="KEY", help=f"the API key (default: ${KEY_ENV})")


def load_api_config(url: str | None = None, api_key: str | None = None) -> ApiConfig:
    """Each of URL and key from its option, else its variable, else `cave up`'s api.json."""
    saved = _read_api_file(api_file())
    url = url or os.environ.get(URL_ENV) or saved.get("url")
    api_key = api_key or os.environ.get(KEY_ENV) or saved.get("admin_key")
    if not url:
        raise ConfigError(NO_API)
    if not api_key:
        raise ConfigError(NO_KEY)
    return ApiConfig(str(url), str(api_key))


def _read_api_file(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return saved


@contextmanager
def api_client(args: argparse.Namespace) -> Iterator[Cave]:
    """A client for the command's API; its errors come out as CaveErrors for main() to print."""
    from cave.client import Cave, CaveAPIError

    config = load_api_config(args.url, args.api_key)
    try:
        with Cave(config.url, config.api_key) as client:
            yield client
    except CaveAPIError as exc:
        raise CaveError(describe(exc)) from exc


def describe(exc: CaveAPIError) -> str:
    """The API's message (it names the fields of a validation error); a 5xx's request id."""
    from cave.client import InternalServerError

    if isinstance(exc, InternalServerError) and exc.request_id:
        return f"{exc.message} (request id {exc.request_id})"
    return exc.message


def command(
    group: argparse._SubParsersAction,
    name: str,
    text: str,
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A verb that talks to the API: `verb`'s, with the connection's arguments."""
    parser = verb(group, name, text, handler)
    add_connection_arguments(parser)
    return parser


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", dest="as_json", help="print JSON instead of a table"
    )


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the last one is not padded."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"
