"""`ClusterNode`: one node of the cluster as a Prefect block, so the UI can edit it.

`dispatch nodes import` turns each `nodes.json` entry into one of these (document name: the node's name,
slugified); `to_node()` gives the scheduler's `dispatch.cluster.config.Node` back. A node's SSH private key can
live here as a secret (`private_key`) instead of in a file on every dispatcher's machine; it is unwrapped
only by `ssh_target()`, the one way to get a connection target for the node.

Examples:
    >>> node = ClusterNode.load("gpu1")  # doctest: +SKIP
    >>> SSHPool().run(node.ssh_target(), "nproc", timeout=30)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr

from dispatch.cluster.config import Node
from dispatch.cluster.ssh_target import SSHTarget

_NOT_SLUG = re.compile(r"[^a-z0-9-]+")


def block_name(node_name: str) -> str:
    """The block document name of a node: lower-cased, every run of other characters replaced by '-'.

    Examples:
        >>> block_name("GPU_1.lab")
        'gpu-1-lab'
    """
    return _NOT_SLUG.sub("-", node_name.lower()).strip("-") or "node"


class ClusterNode(Block):
    """A machine that runs specs: its slots, how to reach it, and what it offers (mirrors `nodes.json`)."""

    # assigning a plain string to a secret field still makes it a SecretStr
    model_config = ConfigDict(validate_assignment=True)

    _block_type_name = "Dispatch Cluster Node"
    _description = "A node of an Oyster Dispatch cluster: slots, transport, SSH details and placement labels."

    name: str = Field(description="Unique node name; its work pool and concurrency limit are `node-<name>`.")
    slots: int = Field(ge=1, description="How many specs the node runs at once.")
    transport: Literal["local", "ssh", "worker"] = Field(
        default="ssh", description="`local` (the dispatcher's machine), `ssh` (pushed over SSH) or `worker` "
                                   "(a Prefect worker on the node pulls from its pool).")
    ssh_host: str | None = Field(default=None, description="Host name, `user@host` or ~/.ssh/config alias.")
    host: str | None = Field(default=None, description="Host name or address to connect to (wins over ssh_host).")
    port: int | None = Field(default=None, ge=1, le=65535, description="SSH port (default 22 or the ssh config's).")
    user: str | None = Field(default=None, description="SSH login user (default: the ssh config's or local user).")
    key_path: str | None = Field(default=None, description="Private key file on the dispatcher's machine.")
    private_key: SecretStr | None = Field(
        default=None, description="The private key's text (OpenSSH or PEM, unencrypted); wins over key_path.")
    known_hosts: str | None = Field(default=None, description="known_hosts file to check the host key against.")
    trust_on_first_use: bool = Field(default=False, description="Accept and save an unknown host key.")
    ssh_config: str | None = Field(default=None, description="An ssh config file to resolve ssh_host with.")
    labels: list[str] = Field(default_factory=list, description="Placement labels a spec can ask for.")
    priority: int = Field(default=0, description="Tie-break between nodes with as many free slots (lower first).")
    models: list[str] | None = Field(
        default=None, description="Models whose CLI the node has (glm, claude, codex, ...); unset: any model.")
    remote_root: str = Field(default="dispatch", description="The node's run root; relative to the login's home.")
    python: str = Field(default="python3", description="The node's Python 3, for the node runner.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment for every spec on the node, e.g. PATH (no secrets).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Other nodes.json fields, kept as they were (api_mode, executor, ...).")

    @property
    def document_name(self) -> str:
        """The name this node's block is saved under."""
        return block_name(self.name)

    def to_node(self) -> Node:
        """The scheduler's view of this node (without the private key: use `ssh_target()` to connect)."""
        return Node(
            name=self.name, slots=self.slots, transport=self.transport, labels=frozenset(self.labels),
            priority=self.priority, models=frozenset(self.models) if self.models is not None else None,
            ssh_host=self.ssh_host, host=self.host, port=self.port, user=self.user, key_path=self.key_path,
            known_hosts=self.known_hosts, trust_on_first_use=self.trust_on_first_use, ssh_config=self.ssh_config,
            remote_root=self.remote_root, python=self.python, env=dict(self.env), options=dict(self.options),
        )

    @classmethod
    def from_node(cls, node: Node, private_key: str | SecretStr | None = None) -> ClusterNode:
        """A block holding `node` (an unsaved one: `block.save(block.document_name, overwrite=True)`).

        Args:
            node: the node, e.g. from `dispatch.cluster.config.load_nodes`.
            private_key: the node's private key text, kept as a secret.
        """
        options = dict(node.options)
        stray = options.pop("private_key", None)  # key text pasted into nodes.json must not be stored in clear
        key = private_key if private_key is not None else stray
        return cls(
            name=node.name, slots=node.slots, transport=node.transport, ssh_host=node.ssh_host, host=node.host,
            port=node.port, user=node.user, key_path=node.key_path,
            private_key=SecretStr(key) if isinstance(key, str) else key, known_hosts=node.known_hosts,
            trust_on_first_use=node.trust_on_first_use, ssh_config=node.ssh_config, labels=sorted(node.labels),
            priority=node.priority, models=sorted(node.models) if node.models is not None else None,
            remote_root=node.remote_root, python=node.python, env=dict(node.env), options=options,
        )

    def ssh_target(self, *, connect_timeout: float = 10.0) -> SSHTarget:
        """How to reach this node over SSH (the private key, if any, is unwrapped here and nowhere else).

        Raises:
            ConfigError: the node's `ssh_config` file does not exist.
        """
        from dispatch.cluster.ssh_target import node_target

        key = self.private_key.get_secret_value() if self.private_key is not None else None
        return node_target(self.to_node(), key_secret=key, connect_timeout=connect_timeout)
