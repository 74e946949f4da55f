"""RayCave: the API for Python code running inside the cluster, through Ray instead of HTTP.

Lifecycle, exec and file calls go to the API deployment through a Serve `DeploymentHandle`, with
the same key, scopes, records and audit as over HTTP. `actor(sandbox_id)` hands out the sandbox's
own actor, bound to that sandbox, for direct `ray.get` calls: the fastest path, for trusted code
in the cluster, and one that writes no per-exec record or audit event.
"""

from __future__ import annotations

import builtins
import os
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError

from cave.errors import AuthError, CaveError

APP_NAME = "cave"
DEPLOYMENT = "ApiIngress"


class RayCave:
    def __init__(self, api_key: str | None = None, app_name: str = APP_NAME) -> None:
        key = api_key or os.environ.get("CAVE_API_KEY")
        if not key:
            raise AuthError("no API key: pass api_key or set CAVE_API_KEY")
        self._key = key
        self._handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app_name)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._handle.call.remote(self._key, method, *args, **kwargs).result()
        except RayTaskError as exc:  # a CaveError raised in the replica comes out as itself
            if isinstance(exc.cause, CaveError):
                raise exc.cause from None
            raise

    def create(self, **request: Any) -> dict[str, Any]:
        """Fields as in POST /api/v1/sandboxes (name, limits, labels, ttl_s, ...)."""
        result: dict[str, Any] = self._call("create", request)
        return result

    def get(self, sandbox_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("get", sandbox_id)
        return result

    def list(self, **filters: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("list", **filters)
        return result

    def stop(self, sandbox_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("stop", sandbox_id)
        return result

    def delete(self, sandbox_id: str) -> None:
        self._call("delete", sandbox_id)

    def exec(
        self, sandbox_id: str, command: str | builtins.list[str], **options: Any
    ) -> dict[str, Any]:
        """Run to completion: exit_code, stdout, stderr, ... as in ExecOut."""
        result: dict[str, Any] = self._call("run", sandbox_id, {"command": command, **options})
        return result

    def write_file(self, sandbox_id: str, path: str, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self._call("write_file", sandbox_id, path, data)
        return result

    def read_file(self, sandbox_id: str, path: str) -> bytes:
        data: bytes = self._call("read_file", sandbox_id, path)
        return data

    def actor(self, sandbox_id: str) -> Any:
        """The sandbox's actor, bound to this sandbox (an `actors.sandbox_ref.SandboxRef`, read
        like an actor handle): `ray.get(actor.run.remote("echo hi"))` (unaudited). Once the
        sandbox stops, its calls fail with SandboxStateError: the actor serves another."""
        try:
            handle: Any = self._handle.actor_of.remote(self._key, sandbox_id).result()
        except RayTaskError as exc:
            if isinstance(exc.cause, CaveError):
                raise exc.cause from None
            raise
        return handle
