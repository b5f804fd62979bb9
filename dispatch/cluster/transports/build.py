"""Where transports are built: one per node, sharing one SSH pool and one flow-run watcher, closed together.

The project run (`ClusterRuntime`), `dispatch collect`/`kill` and the worker's `spec-run` flow all get their
transports here, so a node's transport is made one way whoever asks. The SSH pool (paramiko) and the watcher
(a Prefect client) are made on first need: importing paramiko costs 0.05-0.1 s of every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dispatch.cluster.transports.local import LocalTransport
from dispatch.core.errors import ConfigError
from dispatch.core.nodes import Node

if TYPE_CHECKING:
    from dispatch.cluster.ssh import SSHPool
    from dispatch.cluster.transports.ssh import SSHTransport
    from dispatch.prefect.worker_transport import FlowRunWatcher, WorkerTransport

    NodeTransport = LocalTransport | SSHTransport | WorkerTransport


def local_transport(root: Path, node: str = "local") -> LocalTransport:
    """The transport of runs on this machine under `root` (a local node, or a worker node's own flow)."""
    return LocalTransport(root, node)


class NodeTransports:
    """Builds the transports of configured nodes and owns what they share; `close` ends them all.

    Args:
        runs_dir: the local nodes' run root.
        team_mode: whether a Prefect server is set (worker nodes need one).
        key_secrets: private key text per ssh node name (from `ClusterNode` blocks), when not in files.
    """

    def __init__(self, runs_dir: Path, team_mode: bool, key_secrets: dict[str, str] | None = None) -> None:
        self.runs_dir = runs_dir
        self.team_mode = team_mode
        self.key_secrets = key_secrets or {}
        self.pool: SSHPool | None = None
        self.watcher: FlowRunWatcher | None = None
        self._opened: list[LocalTransport | SSHTransport] = []  # each has a node agent to end

    def for_node(self, node: Node) -> NodeTransport:
        """The transport of `node`, by its `transport` (local, ssh, worker)."""
        if node.transport == "local":
            local = local_transport(self.runs_dir, node.name)
            self._opened.append(local)
            return local
        if node.transport == "ssh":
            from dispatch.cluster.ssh import SSHPool
            from dispatch.cluster.transports.ssh import SSHTransport

            self.pool = self.pool or SSHPool()
            transport = SSHTransport(node, self.pool, self.key_secrets.get(node.name))
            self._opened.append(transport)
            return transport
        if not self.team_mode:
            raise ConfigError(f"node {node.name}: transport 'worker' needs team mode (PREFECT_API_URL set to "
                              "the team's Prefect server, a worker on the node's pool); use transport ssh or "
                              "local without a server")
        from dispatch.prefect.worker_transport import FlowRunWatcher, WorkerTransport

        if self.watcher is None:
            self.watcher = FlowRunWatcher()
        return WorkerTransport(node, self.watcher)

    @property
    def connections_opened(self) -> int:
        """SSH connections opened so far (0 without ssh nodes)."""
        return self.pool.connections_opened if self.pool is not None else 0

    def close(self) -> None:
        """Close the local and ssh transports (their node agents), then the pool and the watcher they share."""
        for transport in self._opened:
            transport.close()
        if self.pool is not None:
            self.pool.close()
        if self.watcher is not None:
            self.watcher.close()

    def __enter__(self) -> NodeTransports:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
