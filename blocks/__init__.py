"""Prefect blocks of Oyster Dispatch: cluster nodes and agent models, editable in the Prefect UI.

`dispatch nodes import` turns `nodes.json` into `ClusterNode` blocks; `AgentModel` blocks hold each
model's command, endpoint and API key (a `SecretStr`).
"""

from blocks.agent_model import AgentModel
from blocks.cluster_node import ClusterNode

__all__ = ["AgentModel", "ClusterNode"]
