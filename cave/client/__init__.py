"""The Python client of the CAVE HTTP API (docs/api.md): `Cave` blocks, `AsyncCave` awaits.

```python
from cave.client import Cave

with Cave() as cave:  # $CAVE_API_URL and $CAVE_API_KEY
    with cave.sandboxes.create(name="demo", limits={"memory_mb": 256}) as sandbox:
        print(sandbox.exec("echo hi").stdout)
```
"""

from cave.client._async import AsyncCave, AsyncKeys, AsyncSandbox, AsyncSandboxes
from cave.client._errors import (
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    AuthenticationError,
    CapacityError,
    CaveAPIError,
    ClientConfigError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    SandboxNotFoundError,
    SandboxStateError,
    SandboxTimeoutError,
    ServiceUnavailableError,
    ValidationError,
)
from cave.client._models import (
    SANDBOX_STATES,
    SCOPES,
    ApiKey,
    CreatedApiKey,
    ExecEvent,
    ExecResult,
    FileEntry,
    FileList,
    FileWritten,
    Guarantees,
    IsolationInfo,
    KeyKind,
    Limits,
    LimitsInfo,
    OutputChunk,
    SandboxInfo,
    SandboxPage,
    SandboxState,
    Scope,
)
from cave.client._sync import Cave, Keys, Sandbox, Sandboxes
from cave.client._transport import KEY_ENV, URL_ENV

__all__ = [
    "KEY_ENV",
    "SANDBOX_STATES",
    "SCOPES",
    "URL_ENV",
    "APIConnectionError",
    "APIResponseError",
    "APITimeoutError",
    "ApiKey",
    "AsyncCave",
    "AsyncKeys",
    "AsyncSandbox",
    "AsyncSandboxes",
    "AuthenticationError",
    "CapacityError",
    "Cave",
    "CaveAPIError",
    "ClientConfigError",
    "ConflictError",
    "CreatedApiKey",
    "ExecEvent",
    "ExecResult",
    "FileEntry",
    "FileList",
    "FileWritten",
    "Guarantees",
    "InternalServerError",
    "IsolationInfo",
    "KeyKind",
    "Keys",
    "Limits",
    "LimitsInfo",
    "NotFoundError",
    "OutputChunk",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "Sandbox",
    "SandboxInfo",
    "SandboxNotFoundError",
    "SandboxPage",
    "SandboxState",
    "SandboxStateError",
    "SandboxTimeoutError",
    "Sandboxes",
    "Scope",
    "ServiceUnavailableError",
    "ValidationError",
]
