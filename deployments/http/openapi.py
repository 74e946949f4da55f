"""The API's OpenAPI document (docs/openapi.json): `python -m deployments.http.openapi`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from deployments.http.app import create_api

DEFAULT_PATH = Path("docs/openapi.json")
# Where `cave up` serves the API by default (cluster.api.DEFAULT_PORT; deployments may not import
# cluster, so the address is spelled out here). Clients pass their own base URL anyway.
SERVERS = [
    {
        "url": "http://127.0.0.1:8000",
        "description": "`cave up` on this machine (CAVE_API_HOST / CAVE_API_PORT change it)",
    }
]


def api_schema() -> dict[str, Any]:
    """The app's OpenAPI document, with every mapping's keys in sorted order so that two builds
    compare and serialise the same. Building the app connects nothing (services start in its
    lifespan), so this runs without a database or Ray."""
    schema = dict(create_api({}).openapi())
    schema["servers"] = SERVERS
    sorted_schema: dict[str, Any] = _sorted(schema)
    return sorted_schema


def render(schema: dict[str, Any]) -> str:
    """The committed text: the format is part of the drift check, not only the content."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python -m deployments.http.openapi [PATH]", file=sys.stderr)
        return 2
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(api_schema()), encoding="utf-8")
    print(f"wrote {path}")
    return 0


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
