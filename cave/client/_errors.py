"""The client's one exception tree, and the table that turns an API error body into its class.

```
CaveAPIError                         (code, message, request_id, status_code, details)
 ├─ ClientConfigError                no base URL or API key given, none in the environment
 ├─ APIConnectionError ── APITimeoutError        (transport: httpx's errors never escape)
 ├─ APIResponseError                 a response the client cannot read (not the contract)
 ├─ ValidationError (400, 422) ── PayloadTooLargeError (413)
 ├─ AuthenticationError (401)
 ├─ PermissionDeniedError (403)
 ├─ NotFoundError (404) ── SandboxNotFoundError
 ├─ ConflictError (409) ── SandboxStateError
 ├─ RateLimitError (429) ── CapacityError, QuotaExceededError
 ├─ ServiceUnavailableError (503)
 ├─ SandboxTimeoutError (504)
 └─ InternalServerError (other 5xx)
```

The class is looked up by HTTP status first, then refined by the body's `error.code` when the
code names a subclass of the status's class. A streamed `{"type": "error"}` event has no status
of its own, so it is mapped by code alone (`status_code` is then None).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


class CaveAPIError(Exception):
    """Base of every error the client raises; `code` is the API's `error.code`."""

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        status_code: int | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        # All arguments go to Exception so that the error pickles unchanged.
        super().__init__(code, message, request_id, status_code, details)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status_code = status_code
        self.details = details

    def __str__(self) -> str:
        return self.message


class ClientConfigError(CaveAPIError):
    """The client was built without a base URL or an API key."""


class APIConnectionError(CaveAPIError):
    """The API could not be reached, or the connection broke mid-response."""


class APITimeoutError(APIConnectionError):
    """The API did not answer within the client's timeout."""


class APIResponseError(CaveAPIError):
    """The API answered something the client cannot read (not JSON, a stream cut short)."""


class ValidationError(CaveAPIError):
    """The request was refused as malformed or out of range (400 or 422)."""


class PayloadTooLargeError(ValidationError):
    """A file or stdin over its limit (413)."""


class AuthenticationError(CaveAPIError):
    """No key, or a malformed, unknown, expired or revoked one (401)."""


class PermissionDeniedError(CaveAPIError):
    """The key lacks the route's scope (403)."""


class NotFoundError(CaveAPIError):
    """No such object in the key's namespace (404)."""


class SandboxNotFoundError(NotFoundError):
    pass


class ConflictError(CaveAPIError):
    """The object's state forbids the action (409)."""


class SandboxStateError(ConflictError):
    """E.g. exec in a stopped sandbox."""


class RateLimitError(CaveAPIError):
    """No room for another sandbox, for now or for this namespace (429)."""


class CapacityError(RateLimitError):
    """The cluster has no room for another sandbox."""


class QuotaExceededError(RateLimitError):
    """The namespace's quota is used up."""


class ServiceUnavailableError(CaveAPIError):
    """The database or Ray cannot be reached (503)."""


class SandboxTimeoutError(CaveAPIError):
    """The sandbox did not answer in time (504)."""


class InternalServerError(CaveAPIError):
    """Any other 5xx; quote its request id when reporting it."""


_BY_STATUS: dict[int, type[CaveAPIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
    504: SandboxTimeoutError,
}

_BY_CODE: dict[str, type[CaveAPIError]] = {
    "invalid_argument": ValidationError,
    "limit_exceeded": ValidationError,
    "invalid_path": ValidationError,
    "validation_error": ValidationError,
    "payload_too_large": PayloadTooLargeError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "sandbox_not_found": SandboxNotFoundError,
    "conflict": ConflictError,
    "sandbox_state": SandboxStateError,
    "capacity": CapacityError,
    "quota_exceeded": QuotaExceededError,
    "unavailable": ServiceUnavailableError,
    "database_unavailable": ServiceUnavailableError,
    "sandbox_timeout": SandboxTimeoutError,
}


def error_class(status_code: int | None, code: str) -> type[CaveAPIError]:
    """The class for an error: by status, refined by code; by code alone without a status."""
    by_code = _BY_CODE.get(code)
    if status_code is None:
        return by_code or CaveAPIError
    by_status = _BY_STATUS.get(status_code)
    if by_status is None:
        by_status = InternalServerError if status_code >= 500 else CaveAPIError
    if by_code is not None and issubclass(by_code, by_status):
        return by_code
    return by_status


def error_from_body(body: Mapping[str, Any], status_code: int | None = None) -> CaveAPIError:
    """The exception for an `ErrorBody` dict (`{"code", "message", "request_id", ...}`)."""
    code = str(body.get("code") or "unknown")
    message = str(body.get("message") or code)
    request_id = body.get("request_id")
    details = body.get("details")
    return error_class(status_code, code)(
        code,
        message,
        str(request_id) if request_id else None,
        status_code,
        details if isinstance(details, list) else None,
    )


def error_from_response(response: httpx.Response) -> CaveAPIError:
    """The exception for a >= 400 response, also when its body is not the API's error JSON."""
    header_id = response.headers.get("x-request-id")
    try:
        body = response.json()["error"]
        if not isinstance(body, dict):
            raise TypeError("error is not an object")
    except (ValueError, KeyError, TypeError):
        # A proxy or a crashed worker answered: keep the status, say what came back.
        text = response.text.strip()[:200] or response.reason_phrase
        body = {"code": f"http_{response.status_code}", "message": text}
    return error_from_body({"request_id": header_id, **body}, response.status_code)


def transport_error(exc: httpx.HTTPError, url: str) -> CaveAPIError:
    """httpx's error translated at the boundary: callers never see an httpx type."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError("timeout", f"the CAVE API at {url} did not answer in time ({exc})")
    if isinstance(exc, httpx.TransportError):
        return APIConnectionError("connection_error", f"cannot reach the CAVE API at {url}: {exc}")
    return APIResponseError("invalid_response", f"bad response from the CAVE API at {url}: {exc}")
