"""The cluster as the dispatcher sees it: nodes, their slots and transports.

The embedded default is one `local` node (this machine) with `DISPATCH_LOCAL_SLOTS` slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dispatch.settings import DispatchSettings


@dataclass
class Node:
    """A machine that runs specs.

    Attributes:
        name: unique node name; its work pool is `node-<name>`.
        slots: how many specs it runs at once.
        transport: `local`, `ssh` or `worker`.
        labels: placement labels a spec can ask for.
        priority: tie-break when nodes have as many free slots (lower first, as in the old system).
        models: models whose CLI the node has; None when unknown (any).
    """

    name: str
    slots: int
    transport: str = "local"
    labels: frozenset[str] = frozenset()
    priority: int = 0
    models: frozenset[str] | None = None
    options: dict = field(default_factory=dict)


def local_node(settings: DispatchSettings) -> Node:
    """The embedded default node: this machine."""
    return Node(name="local", slots=settings.local_slots, transport="local")
