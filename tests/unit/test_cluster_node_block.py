"""The `ClusterNode` block (blocks/cluster_node.py) keeps every field of a node, without a server."""

from __future__ import annotations

from dispatch.core.nodes import Node


def test_a_node_saved_as_a_block_and_read_back_keeps_its_env_and_fields() -> None:
    from blocks.cluster_node import ClusterNode

    node = Node(name="big-box", slots=4, transport="ssh", host="127.0.0.9", user="alice", labels=frozenset({"gpu"}),
                env={"PATH": "/opt/agents/bin:/usr/bin:/bin", "APP_ENV": "ci"}, remote_root="dispatch",
                python="python3", priority=2)

    back = ClusterNode.from_node(node).to_node()

    assert back.env == node.env
    assert (back.name, back.slots, back.host, back.user, back.labels, back.priority) == (
        node.name, node.slots, node.host, node.user, node.labels, node.priority)
