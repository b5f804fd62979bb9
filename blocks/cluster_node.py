"""`ClusterNode`: one node of the cluster as a Prefect block, so the UI can edit it.

`dispatch nodes import` turns each `nodes.json` entry into one of these (document name: the node's name,
slugified). The block *is* the node model (`dispatch.core.nodes.Node`: same fields, same checks) plus a
private key; `to_node()` gives the scheduler's `Node` back. The key can live here as a secret instead of in
a file on every dispatcher's machine; it is unwrapped only by `ssh_target()`, the one way to get a
connection target for the node.

Examples:
    >>> node = ClusterNode.load("gpu1")  # doctest: +SKIP
    >>> SSHPool().run(node.ssh_target(), "nproc", timeout=30)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import Any

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr

from dispatch.cluster.ssh_target import SSHTarget
from dispatch.core.nodes import Node

_NOT_SLUG = re.compile(r"[^a-z0-9-]+")


def block_name(node_name: str) -> str:
    """The block document name of a node: lower-cased, every run of other characters replaced by '-'.

    Examples:
        >>> block_name("GPU_1.lab")
        'gpu-1-lab'
    """
    return _NOT_SLUG.sub("-", node_name.lower()).strip("-") or "node"


class ClusterNode(Block, Node):
    """A machine that runs specs: every field of a `nodes.json` node (`dispatch.core.nodes.Node`, checked as
    `nodes.json` is), plus its private key."""

    # a block keeps fields it does not know (saved by another version); assigning a plain string to a secret
    # field still makes it a SecretStr, and an edit is checked as nodes.json is
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    _block_type_name = "Dispatch Cluster Node"
    _description = "A node of an Oyster Dispatch cluster: slots, transport, SSH details and placement labels."

    private_key: SecretStr | None = Field(
        default=None, description="The private key's text (OpenSSH or PEM, unencrypted); wins over key_path.")

    @property
    def document_name(self) -> str:
        """The name this node's block is saved under."""
        return block_name(self.name)

    def to_node(self) -> Node:
        """The scheduler's view of this node (without the private key: use `ssh_target()` to connect)."""
        return Node.model_validate({name: getattr(self, name) for name in Node.model_fields})

    @classmethod
    def from_node(cls, node: Node, private_key: str | SecretStr | None = None) -> ClusterNode:
        """A block holding `node` (an unsaved one: `block.save(block.document_name, overwrite=True)`).

        Args:
            node: the node, e.g. from `dispatch.cluster.config.load_nodes`.
            private_key: the node's private key text, kept as a secret.
        """
        fields: dict[str, Any] = {name: getattr(node, name) for name in Node.model_fields}
        fields["options"] = options = dict(node.options)
        stray = options.pop("private_key", None)  # key text pasted into nodes.json must not be stored in clear
        return cls(**fields, private_key=private_key if private_key is not None else stray)

    def ssh_target(self, *, connect_timeout: float = 10.0) -> SSHTarget:
        """How to reach this node over SSH (the private key, if any, is unwrapped here and nowhere else).

        Raises:
            ConfigError: the node's `ssh_config` file does not exist.
        """
        from dispatch.cluster.ssh_target import node_target

        key = self.private_key.get_secret_value() if self.private_key is not None else None
        return node_target(self.to_node(), key_secret=key, connect_timeout=connect_timeout)
