"""SandboxDirectory: a named Ray actor that maps sandbox ids to their actor handles and nodes."""

from __future__ import annotations

import ray
from ray.actor import ActorHandle

from cave.errors import SandboxNotFoundError

DIRECTORY_NAME = "cave-directory"


class DirectoryService:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[ActorHandle, str]] = {}

    def register(self, sandbox_id: str, actor: ActorHandle, node_id: str) -> None:
        self._entries[sandbox_id] = (actor, node_id)

    def lookup(self, sandbox_id: str) -> tuple[ActorHandle, str]:
        try:
            return self._entries[sandbox_id]
        except KeyError:
            raise SandboxNotFoundError(f"no sandbox with id {sandbox_id!r}") from None

    def remove(self, sandbox_id: str) -> None:
        self._entries.pop(sandbox_id, None)

    def ids(self) -> list[str]:
        return sorted(self._entries)


SandboxDirectory = ray.remote(num_cpus=0, max_restarts=-1)(DirectoryService)
