"""The cluster at run time: one transport per node, the shared SSH pool, slot brokers, node probes.

Built once per project run from the configured nodes. Nodes that fail are marked down by the flow
and probed in the background until they answer again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from dispatch.cluster.transports.build import NodeTransports
from dispatch.cluster.transports.local import LocalTransport
from dispatch.core.brokers import Brokers, MachineSlots
from dispatch.core.errors import ConfigError, DispatchError
from dispatch.core.nodes import Node
from dispatch.core.settings import DispatchSettings
from dispatch.prefect.errors import SERVER_ERRORS
from dispatch.prefect.limits import server_limits
from dispatch.prefect.slots import ServerSlots

if TYPE_CHECKING:
    from dispatch.cluster.transports.build import NodeTransport

logger = logging.getLogger(__name__)
_PROBE_INTERVAL = 5.0


class ClusterRuntime:
    """Transports, brokers and health of the nodes a project run uses.

    In team mode (a Prefect server), no node other dispatchers share is placed on without its `node-<name>`
    limit on the server: a missing one is created from the node's slots (`server_limits`), unless
    `DISPATCH_SERVER_SLOTS` is off (a server on SQLite).

    Args:
        settings: the process settings.
        nodes: the configured nodes.
        key_secrets: private key text per node name (from `ClusterNode` blocks), when not in files.
        log: where to report what it did on the server (the flow's run logger).
    """

    def __init__(self, settings: DispatchSettings, nodes: list[Node],
                 key_secrets: dict[str, str] | None = None,
                 log: logging.Logger | logging.LoggerAdapter = logger) -> None:
        self.nodes = {node.name: node for node in nodes}
        self._built = NodeTransports(settings.runs_dir, bool(settings.prefect_api_url), key_secrets)
        try:
            self.transports: dict[str, NodeTransport] = {node.name: self._built.for_node(node) for node in nodes}
        except ConfigError:
            self._built.close()
            raise
        limits: dict[str, str] = {}
        if settings.prefect_api_url and settings.server_slots:
            try:
                limits = server_limits(nodes, log)
            except SERVER_ERRORS as exc:
                raise DispatchError(f"cannot read or create the node limits on the Prefect server at "
                                    f"{settings.prefect_api_url}: {exc}") from exc
        self.brokers = Brokers(MachineSlots(settings.locks_dir, {n.name: n.slots for n in nodes}),
                               ServerSlots(limits) if limits else None, set(limits))
        self._probing: set[str] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def connections_opened(self) -> int:
        """SSH connections opened so far (0 without ssh nodes)."""
        return self._built.connections_opened

    def is_local(self, node: str) -> bool:
        return isinstance(self.transports[node], LocalTransport)

    def probe_until_up(self, node: str, on_up: Callable[[str], None]) -> None:
        """Probe a down node in the background; call `on_up(node)` once it answers again."""
        transport = self.transports[node]
        if isinstance(transport, LocalTransport):
            on_up(node)
            return
        with self._lock:
            if node in self._probing:
                return
            self._probing.add(node)

        def probe() -> None:
            while not self._closed.wait(_PROBE_INTERVAL):
                try:
                    transport.probe()
                except DispatchError as exc:
                    logger.debug("node %s still down: %s", node, exc)
                    continue
                logger.info("node %s answers again", node)
                break
            with self._lock:
                self._probing.discard(node)
            if not self._closed.is_set():
                on_up(node)

        threading.Thread(target=probe, name=f"probe-{node}", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.brokers.close()
        self._built.close()
