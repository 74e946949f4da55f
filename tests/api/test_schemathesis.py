"""Schemathesis against the live API from docs/openapi.json: no 5xx, and every response has a
status, content type and body that the committed schema declares; operation by operation, and in
sequences that follow the links schemathesis infers between them (create a sandbox or key, then
use it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.stateful.state_machine import APIStateMachine
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cave.auth import api_keys
from tests.api.conftest import ApiServer

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
MAX_EXAMPLES = 20
STATEFUL_EXAMPLES = 25  # scenarios, each a chain of at most STATEFUL_STEPS linked calls
STATEFUL_STEPS = 6
CONFIG_BASE: dict[str, Any] = {
    "seed": 20240601,
    "generation": {
        # Valid inputs must succeed or fail as documented, invalid ones must be a 4xx.
        "mode": "all",
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
        # The admin key goes in every call instead of generated Authorization headers.
        "with-security-parameters": False,
    },
}
CONFIG = schemathesis.Config.from_dict(
    {
        **CONFIG_BASE,
        # Boundary values per field (coverage) would multiply sandboxes past the time budget.
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    }
)
SCHEMA = schemathesis.openapi.from_path(SCHEMA_PATH, config=CONFIG)
# The stateful phase on its own schema object: links are inferred (from response schemas and
# path parameters) only where that phase is enabled.
LINKED_SCHEMA = schemathesis.openapi.from_path(
    SCHEMA_PATH,
    config=schemathesis.Config.from_dict(
        {
            **CONFIG_BASE,
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": True}},
        }
    ),
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# These would take the shared sandbox away from the operations that come after them.
KEEP_GENERATED_ID = {
    ("DELETE", "/api/v1/sandboxes/{sandbox_id}"),
    ("POST", "/api/v1/sandboxes/{sandbox_id}/stop"),
}


@pytest.fixture(scope="module")
def admin(api_server: ApiServer) -> Iterator[httpx.Client]:
    with api_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def created_during_module(admin: httpx.Client) -> Iterator[None]:
    """Deletes the sandboxes and revokes the keys that the module made: generated sandboxes hold
    memory and a pool slot, and generated keys must not outlive the run."""
    sandboxes_before, keys_before = _sandbox_ids(admin), _key_ids(admin)
    yield
    for sandbox_id in _sandbox_ids(admin) - sandboxes_before:
        response = admin.delete(f"/api/v1/sandboxes/{sandbox_id}")
        assert response.status_code in (204, 404), response.text
    for key_id in _key_ids(admin) - keys_before:
        response = admin.delete(f"/api/v1/auth/keys/{key_id}")
        assert response.status_code in (204, 404), response.text
    assert _sandbox_ids(admin) <= sandboxes_before
    assert _key_ids(admin) <= keys_before


@pytest.fixture(scope="module")
def sandbox_id(admin: httpx.Client, created_during_module: None) -> str:
    """One running sandbox, so that exec and file operations reach a real workspace rather than
    stopping at 404. Its short timeout bounds whatever generated command runs in it."""
    body = {"name": "schemathesis", "limits": {"timeout_s": 10}}
    response = admin.post("/api/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_schema(
    case: schemathesis.Case, api_server: ApiServer, sandbox_id: str
) -> None:
    if "sandbox_id" in case.path_parameters and _label(case) not in KEEP_GENERATED_ID:
        case.path_parameters["sandbox_id"] = sandbox_id
    headers = {"Authorization": f"Bearer {api_server.admin_key}"}
    case.call_and_validate(base_url=api_server.url, headers=headers, checks=CHECKS, timeout=60)


def _label(case: schemathesis.Case) -> tuple[str, str]:
    return case.method.upper(), case.path


def _sandbox_ids(client: httpx.Client) -> set[str]:
    ids: set[str] = set()
    params: dict[str, Any] = {"limit": 200}
    while True:
        response = client.get("/api/v1/sandboxes", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        ids.update(item["id"] for item in page["items"])
        if not page.get("next_cursor"):
            return ids
        params["cursor"] = page["next_cursor"]


def _key_ids(client: httpx.Client) -> set[str]:
    response = client.get("/api/v1/auth/keys")
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"] if item["revoked_at"] is None}


def test_linked_operations_conform(
    api_server: ApiServer, sandbox_id: str, created_during_module: None
) -> None:
    """Stateful phase: each scenario creates something (a sandbox, a key) and calls the
    operations linked to it with the id it got back, so the routes behind an existing id are
    fuzzed too, not only their 404s."""
    machine = _linked_machine(api_server)
    machine.run(
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    assert LINKED_SCHEMA.statistic.transitions.total > 0, "no links were inferred: nothing ran"


def _linked_machine(api_server: ApiServer) -> type[APIStateMachine]:
    base = LINKED_SCHEMA.as_state_machine()
    headers = {"Authorization": f"Bearer {api_server.admin_key}"}

    admin_key_id, _ = api_keys.parse(api_server.admin_key)

    class LinkedOperations(base):  # type: ignore[valid-type, misc]
        def before_call(self, case: schemathesis.Case) -> None:
            # A key id found in a listing may be the suite's own admin key: revoking or rotating
            # it would end the session's access, not test anything.
            if case.path_parameters and case.path_parameters.get("key_id") == admin_key_id:
                case.path_parameters["key_id"] = "k" + admin_key_id[1:][::-1]

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": api_server.url, "headers": headers, "timeout": 60}

        def validate_response(
            self,
            response: Any,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            case.validate_response(response, checks=CHECKS)

    return LinkedOperations
