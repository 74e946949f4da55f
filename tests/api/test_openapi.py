"""The committed docs/openapi.json is the app's schema, and a valid OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path

from openapi_spec_validator import validate

from deployments.http.openapi import api_schema, render

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_committed_schema_matches_the_app() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render(api_schema()), (
        "docs/openapi.json differs from the app's schema: run `make api-schema` and commit it"
    )


def test_committed_schema_is_valid_openapi() -> None:
    validate(json.loads(COMMITTED.read_text(encoding="utf-8")))


def test_committed_schema_names_every_route_and_the_bearer_scheme() -> None:
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "/api/v1/sandboxes/{sandbox_id}/exec" in schema["paths"]
    assert "/healthz" in schema["paths"]
    # Not JSON operations: Prometheus text and the MCP transport stay out of the contract.
    assert "/metrics" not in schema["paths"]
    assert not any(path.startswith("/mcp") for path in schema["paths"])
