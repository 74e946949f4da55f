"""The token of an `Authorization: Bearer <token>` header, for API keys and model-access keys."""

from __future__ import annotations

from cave.errors import AuthError


def bearer_token(authorization: str | None, what: str) -> str:
    """The token; AuthError (401) naming `what` ("API key", ...) when missing or malformed."""
    if not authorization:
        raise AuthError(f"missing {what}: send Authorization: Bearer <key>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected Bearer <key>")
    return token.strip()
