"""The one exception tree of CAVE; every layer raises these, only `deployments/` maps them to HTTP.

```
CaveError
 ├─ ConfigError                      (start-up: a malformed setting, names the variable)
 ├─ InvalidArgumentError ── LimitExceededError ── PayloadTooLargeError; InvalidPathError
 ├─ NotFoundError ── SandboxNotFoundError
 ├─ ConflictError ── SandboxStateError
 ├─ QuotaExceededError ── CapacityError, RateLimitedError, OverloadedError
 ├─ AuthError ── TokenExpiredError, TokenRevokedError, NamespaceMismatchError
 ├─ SandboxError ── SandboxTimeoutError, IsolationUnavailableError
 ├─ DatabaseUnavailableError         (the database went away: the API answers 503)
 ├─ ServiceUnavailableError ── RevocationsStaleError  (a needed part is not configured or down)
 ├─ AuditLogError                    (the audit log cannot be read, continued or written)
 └─ InferenceUnavailableError
```

Every error passes all its constructor arguments to `super().__init__` so that it pickles across
Ray processes unchanged (the Ray Serve habit).
"""

from __future__ import annotations


class CaveError(Exception):
    """Base of every error CAVE raises on purpose."""

    code = "cave_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(CaveError):
    """A setting is malformed; raised at start-up, the message names the variable."""

    code = "config_error"


class InvalidArgumentError(CaveError):
    """The caller passed something that can never work (negative limit, bad path, ...)."""

    code = "invalid_argument"


class LimitExceededError(InvalidArgumentError):
    """A requested per-sandbox limit is above the configured maximum."""

    code = "limit_exceeded"


class PayloadTooLargeError(LimitExceededError):
    """A request body (a file, stdin) is bigger than the API accepts."""

    code = "payload_too_large"


class InvalidPathError(InvalidArgumentError):
    """A file path leaves the sandbox workspace (`..`, absolute escape, symlink escape)."""

    code = "invalid_path"


class NotFoundError(CaveError):
    code = "not_found"


class SandboxNotFoundError(NotFoundError):
    code = "sandbox_not_found"


class ConflictError(CaveError):
    code = "conflict"


class SandboxStateError(ConflictError):
    """The operation is not allowed in the sandbox's current state (e.g. exec after stop)."""

    code = "sandbox_state"


class QuotaExceededError(CaveError):
    """A namespace is at one of its quotas (`quota` names it: sandboxes, memory_mb, cpu,
    concurrent_execs), or the cluster is full; retry after `retry_after_s`."""

    code = "quota_exceeded"

    def __init__(
        self,
        message: str,
        quota: str = "",
        limit: float | None = None,
        used: float | None = None,
        retry_after_s: float = 5.0,
    ) -> None:
        super().__init__(message)
        self.args = (message, quota, limit, used, retry_after_s)  # pickles as cls(*args)
        self.quota, self.limit, self.used = quota, limit, used
        self.retry_after_s = retry_after_s


class CapacityError(QuotaExceededError):
    """No node has room for another sandbox."""

    code = "capacity"


class OverloadedError(QuotaExceededError):
    """CAVE is too busy to take this request now (the database's writers are queued past their
    wait); nothing of it was done, and the same request may be sent again after `retry_after_s`."""

    code = "overloaded"


class RateLimitedError(QuotaExceededError):
    """A model-access key used its requests or tokens of the minute; retry after `retry_after_s`."""

    code = "rate_limited"

    def __init__(
        self,
        message: str,
        retry_after_s: float,
        quota: str = "",
        limit: float | None = None,
        used: float | None = None,
    ) -> None:
        super().__init__(message, quota, limit, used, retry_after_s)
        self.args = (message, retry_after_s, quota, limit, used)  # pickles as cls(*args)


class AuthError(CaveError):
    code = "unauthorized"


class TokenExpiredError(AuthError):
    code = "token_expired"


class TokenRevokedError(AuthError):
    code = "token_revoked"


class NamespaceMismatchError(AuthError):
    code = "namespace_mismatch"


class SandboxError(CaveError):
    """The sandbox runtime failed (not the user's command: that is a normal exit code)."""

    code = "sandbox_error"


class SandboxTimeoutError(SandboxError):
    code = "sandbox_timeout"


class IsolationUnavailableError(SandboxError):
    """Neither namespaces nor bubblewrap work here and degraded mode is forbidden."""

    code = "isolation_unavailable"


class DatabaseUnavailableError(CaveError):
    """The database cannot be reached or failed mid-transaction; nothing was half written."""

    code = "database_unavailable"


class ServiceUnavailableError(CaveError):
    """A part this request needs is not configured or not up (the API answers 503)."""

    code = "unavailable"


class RevocationsStaleError(ServiceUnavailableError):
    """This replica's view of revoked model-access keys is too old to trust: model-access keys
    are refused (fail closed) until a refresh succeeds; retry after `retry_after_s`."""

    code = "revocations_stale"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.args = (message, retry_after_s)  # pickles as cls(*args), across Ray processes
        self.retry_after_s = retry_after_s


class AuditLogError(CaveError):
    """The audit log is unreadable, damaged where it must continue, or failed a write."""

    code = "audit_log"


class InferenceUnavailableError(CaveError):
    code = "inference_unavailable"
