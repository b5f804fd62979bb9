"""Which node takes a ready spec: the nodes as the scheduler sees them, which of them fit a spec, which is chosen.

A node fits a spec when it is the spec's `node` (if it names one), carries every label of the spec, and, for an
agent spec, has the CLI of one of its models. Of the fitting nodes with a free slot, the one with the most free
slots is chosen (then the better `priority`, then the name). A retry after a node fault waits for another node
rather than go back to the faulty one, unless no other node fits at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dispatch.core.specs import Spec


@dataclass
class NodeSlots:
    """A node as the scheduler sees it: a name, a slot count, labels and a tie-break priority."""

    name: str
    slots: int
    labels: frozenset[str] = frozenset()
    priority: int = 0
    models: frozenset[str] | None = None  # models whose CLI is installed; None: any
    used: int = 0
    down: bool = False  # unreachable: nothing new is placed here until it answers again
    drained: bool = False  # taken out of service (dispatch/core/drain.py): its running specs finish, no new one starts
    full_until: float = 0.0  # another dispatcher held all its slots when last asked: not tried again before this

    @property
    def free(self) -> int:
        return 0 if self.down or self.drained else self.slots - self.used


def fits(spec: Spec, node: NodeSlots) -> bool:
    """Whether `node` could ever run `spec` (its `node`, `labels` and models), free slots aside."""
    if spec.node is not None and spec.node != node.name:
        return False
    if not set(spec.labels) <= node.labels:
        return False
    if node.models is not None and spec.kind == "agent" and not set(spec.model_chain) & node.models:
        return False
    return True


def choose_node(spec: Spec, nodes: Iterable[NodeSlots], avoid: set[str], now: float,
                prefer: Mapping[str, int] | None = None) -> NodeSlots | None:
    """The node to start `spec` on now, or None when no fitting node has a free slot.

    Args:
        spec: the spec.
        nodes: every node of the run.
        avoid: nodes an earlier attempt of the spec failed on through the node's fault.
        now: the scheduler's clock (a node another dispatcher filled is skipped until its `full_until`).
        prefer: nodes where this run holds a slot already (a parked server slot: dispatch/core/brokers.py),
            chosen first: starting there costs no call to the server.
    """
    fitting = [n for n in nodes if fits(spec, n)]
    # A retry after a node fault waits for a healthy node rather than go back to the faulty one,
    # unless no other node can run it at all.
    healthy = [n for n in fitting if n.name not in avoid] or fitting
    free = [n for n in healthy if n.free > 0 and n.full_until <= now]
    if not free:
        return None
    prefer = prefer or {}
    return max(free, key=lambda n: (prefer.get(n.name, 0) > 0, n.free, -n.priority, n.name))
