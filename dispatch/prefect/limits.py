"""The nodes' slot limits on the Prefect server: the global concurrency limit `node-<name>` of each node other
dispatchers share, whose leases are the slots of `dispatch.prefect.slots.ServerSlots`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dispatch.core.brokers import SHARED_TRANSPORTS
from dispatch.core.errors import ConfigError

if TYPE_CHECKING:
    from dispatch.core.nodes import Node

logger = logging.getLogger(__name__)


def server_limits(nodes: list[Node], log: logging.Logger | logging.LoggerAdapter = logger) -> dict[str, str]:
    """Node name -> limit name `node-<name>` on the Prefect server, for every node other dispatchers share
    (ssh, worker): a missing limit is created from the node's slots (and `log` says so), because a node
    placed on without it would be counted by this dispatcher alone.

    Args:
        nodes: the cluster's nodes.
        log: where to say which limits were created (the flow passes its run logger).

    Raises:
        ConfigError: a node's limit exists but is inactive (not enforced); the message says how to enable it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    found: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for node in nodes:
            if node.transport not in SHARED_TRANSPORTS:
                continue
            try:
                limit = client.read_global_concurrency_limit_by_name(node.pool)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=node.pool,
                                                                                        limit=node.slots))
                except ObjectAlreadyExists:  # another dispatcher made it a moment ago
                    limit = client.read_global_concurrency_limit_by_name(node.pool)
                else:
                    log.warning("node %s had no concurrency limit %s on the Prefect server, so other dispatchers "
                                "would not share its slot count: created it with limit %d (its slots); "
                                "`dispatch nodes sync` keeps pools and limits in step with nodes.json",
                                node.name, node.pool, node.slots)
                    found[node.name] = node.pool
                    continue
            if not limit.active:
                raise ConfigError(f"node {node.name}: its concurrency limit {node.pool} on the Prefect server is "
                                  f"inactive, so slots would not be shared; enable it with `prefect "
                                  f"global-concurrency-limit enable {node.pool}`")
            if limit.limit != node.slots:
                log.warning("node %s: concurrency limit %s allows %d at once but nodes.json says %d slots; "
                            "`dispatch nodes sync` sets it to the slots", node.name, node.pool, limit.limit,
                            node.slots)
            found[node.name] = limit.name
    return found
