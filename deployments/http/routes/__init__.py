"""The API's routers, one module per resource."""

from typing import Any

from deployments.schemas import ErrorOut

# Declared on every router so that the OpenAPI schema names each error response's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "A value the service refuses",
        401: "No key, or a bad, expired or revoked one",
        403: "The key lacks the scope",
        404: "Not found in the key's namespace",
        409: "The object's state forbids this",
        413: "Payload too large",
        422: "The request does not match the schema",
        429: "No capacity, or the key's rate limit (see Retry-After)",
        503: "A dependency is unavailable",
    }.items()
}


def created_links(parameter: str, operation_ids: list[str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI links from a 201 to the operations that take the new object's `id` as
    `parameter`: clients and schemathesis' stateful phase follow them (create, then use)."""
    links = {
        operation_id: {"operationId": operation_id, "parameters": {parameter: "$response.body#/id"}}
        for operation_id in operation_ids
    }
    return {201: {"links": links}}
