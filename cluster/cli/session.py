"""The CLI's link to a running cluster: a Ray driver connection (commands that need Ray)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from actors.warm_pool import NAMESPACE
from cluster.cli.base import cave_home
from cluster.local import ClusterError, cluster_address, running_cluster, use_cluster_token

NO_CLUSTER = "no CAVE cluster is running; start one with `cave up`"


@contextmanager
def connected(address: str | None = None) -> Iterator[str]:
    """A driver connection to the given cluster, else the running one; disconnects on exit."""
    address = address or cluster_address(cave_home())
    if address is None:
        raise ClusterError(NO_CLUSTER)
    _use_token_of(address)
    try:
        ray.init(
            address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False
        )
    except ConnectionError as exc:
        raise ClusterError(
            f"cannot reach the cluster at {address} ({exc}); start one with `cave up`"
        ) from None
    try:
        yield address
    finally:
        ray.shutdown()


def _use_token_of(address: str) -> None:
    """Our cluster (also when reached through RAY_ADDRESS) wants its token; others keep theirs."""
    info = running_cluster(cave_home())
    if info is not None and address.rsplit(":", 1)[-1] == str(info.port):
        use_cluster_token(info)
