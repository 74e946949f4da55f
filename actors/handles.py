"""Where the cluster's sandbox actors are: the directory, each node's warm pool, a node to use;
and the one translation of Ray's errors into CaveErrors at the actor boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RaySystemError,
    RayTaskError,
)

from actors.directory import DIRECTORY_NAME, SandboxDirectory
from actors.warm_pool import NAMESPACE, WarmPool, pinned, pool_name
from cave.errors import (
    CapacityError,
    CaveError,
    SandboxError,
    SandboxStateError,
    ServiceUnavailableError,
)
from config.settings import Settings


@contextmanager
def translated(sandbox_id: str) -> Iterator[None]:
    """Ray's errors become CaveErrors: a dead actor is a state error, a CaveError raised inside
    the actor comes out as itself (Ray wraps it in RayTaskError)."""
    try:
        yield
    except RayTaskError as exc:
        if isinstance(exc.cause, CaveError):
            raise exc.cause from None
        raise SandboxError(f"sandbox {sandbox_id}: {exc.cause!r}") from exc
    except RayActorError as exc:
        raise SandboxStateError(f"sandbox {sandbox_id} is stopped or lost") from exc
    except ActorUnavailableError as exc:  # restarting, or its node briefly unreachable
        raise ServiceUnavailableError(
            f"sandbox {sandbox_id}: an actor it needs is restarting; retry in a moment"
        ) from exc
    except (RaySystemError, GetTimeoutError) as exc:
        raise SandboxError(f"sandbox {sandbox_id}: {exc}") from exc


def _cluster() -> str:
    """Handles are cached per cluster: a driver may shut Ray down and connect to another."""
    return str(ray.get_runtime_context().gcs_address)


def directory() -> ActorHandle:
    return _directory_of(_cluster())


@cache
def _directory_of(cluster: str) -> ActorHandle:
    # cast: Ray's stubs type `.remote()` on an actor class as handle-or-class.
    return cast(
        ActorHandle,
        SandboxDirectory.options(
            name=DIRECTORY_NAME,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
        ).remote(),
    )


def warm_pool(node_id: str, settings: Settings) -> ActorHandle:
    """The node's pool, created with these settings by whoever asks first."""
    return _pool_of(_cluster(), node_id, settings)


@cache
def _pool_of(cluster: str, node_id: str, settings: Settings) -> ActorHandle:
    return cast(
        ActorHandle,
        WarmPool.options(
            name=pool_name(node_id),
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            **pinned(node_id),
        ).remote(node_id, settings.isolation, settings.defaults, settings.pool),
    )


def choose_node(node_id: str | None = None) -> str:
    """The given node if alive, else this driver's node when alive, else the first alive node."""
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if node_id is not None:
        if node_id not in alive:
            raise CapacityError(f"node {node_id} is not an alive node of this cluster")
        return node_id
    here = ray.get_runtime_context().get_node_id()
    if here in alive:
        return here
    if not alive:
        raise CapacityError("the cluster has no alive node")
    return alive[0]
