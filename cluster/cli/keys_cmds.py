"""`cave keys create|ls|rotate|revoke`: the API's keys, through `cave.client`."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cluster.cli.api_config import add_json_flag, api_client, command, print_json, print_table, when
from cluster.cli.base import ClientValues

if TYPE_CHECKING:  # the HTTP client loads when a command runs, not for `cave --help`
    from cave.client import ApiKey, CreatedApiKey

HEADERS = ("ID", "NAME", "KIND", "NAMESPACE", "SCOPES", "STATUS", "EXPIRES")


def add_commands(verbs: argparse._SubParsersAction) -> None:
    """Add the key verbs to `cave keys`."""
    _add_create(command(verbs, "create", "create an API key; it is shown only once", _create))
    listing = command(verbs, "ls", "list API keys (never their secrets)", _ls)
    listing.add_argument("--namespace", metavar="NS", help="only this namespace (admin keys)")
    add_json_flag(listing)
    rotate = command(verbs, "rotate", "replace a key; the old one works for a grace time", _rotate)
    rotate.add_argument("key_id", metavar="ID")
    rotate.add_argument(
        "--grace-s", type=float, metavar="S", help="how long the old key keeps working"
    )
    add_json_flag(rotate)
    revoke = command(verbs, "revoke", "revoke a key at once", _revoke)
    revoke.add_argument("key_id", metavar="ID")


def _add_create(parser: argparse.ArgumentParser) -> None:
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--admin", action="store_true", help="an admin key: every namespace")
    kind.add_argument("--namespace", metavar="NS", help="a key of this namespace only")
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        choices=ClientValues("SCOPES"),
        metavar="S",
        help="a scope (repeatable): %(choices)s",
    )
    parser.add_argument("--name", default="", metavar="N", help="a name for people")
    parser.add_argument("--ttl-s", type=float, metavar="S", help="it expires this long from now")
    add_json_flag(parser)


def _create(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        created = client.keys.create(
            kind="admin" if args.admin else "namespace",
            namespace=args.namespace,
            scopes=args.scope,
            name=args.name,
            ttl_s=args.ttl_s,
        )
    _print_created(created, args.as_json)
    return 0


def _ls(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        keys = client.keys.list(args.namespace)
    if args.as_json:
        print_json([key.model_dump(mode="json") for key in keys])
    else:
        print_table(HEADERS, [_row(key) for key in keys])
    return 0


def _rotate(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        created = client.keys.rotate(args.key_id, grace_s=args.grace_s)
    _print_created(created, args.as_json)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        client.keys.revoke(args.key_id)
    print(args.key_id)
    return 0


def _print_created(created: CreatedApiKey, as_json: bool) -> None:
    """The full key goes to stdout alone on its last line; a reminder goes to stderr."""
    if as_json:
        print_json(created.model_dump(mode="json"))
        return
    print_table(HEADERS, [_row(created)])
    print(created.key)
    print("cave: this is the only time the key is shown; keep it now", file=sys.stderr)


def _row(key: ApiKey) -> tuple[str, ...]:
    return (
        key.id,
        key.name or "-",
        key.kind,
        key.namespace or "*",
        ",".join(key.scopes) or "-",
        _status(key),
        when(key.expires_at),
    )


def _status(key: ApiKey) -> str:
    ends = [moment for moment in (key.expires_at, key.grace_until) if moment is not None]
    if key.revoked_at is not None:
        return "revoked"
    if any(_aware(moment) <= datetime.now(UTC) for moment in ends):
        return "expired"
    return "rotated" if key.grace_until is not None else "active"


def _aware(moment: datetime) -> datetime:
    """The API's times are UTC; one without a zone is read as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
