"""The in-flow ready queue: which spec runs next, on which node, and what a finished spec unblocks.

Prefect-free and clock-injected so it can be tested alone. The project flow asks `pick()` for work
whenever something changes (a spec finished, a retry delay ran out) and tells `finish()` how each
spec ended. Nothing here blocks or polls: the flow dispatches the next spec the moment one ends.

Order (dispatch/core/order.py): by how much the project waits on the spec, its rank: the longest remaining path
through dependencies and file locks, by estimated durations. `priority` then moves a spec ahead of a
higher-ranked one only where the estimates say that costs the project at most `PRIORITY_MARGIN` of its
length (dispatch/core/ranking.py); `order="priority"` (projects.json `order: priority`) keeps strict priority
first, rank second. A spec starts only with a free slot on a node that fits it (dispatch/core/placement.py) and
every file lock it needs, taken together (no hold-and-wait). An `exclusive` spec runs with nothing else of its
project; when it is first in line, nothing new starts until it has run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dispatch.core.dag import Project
from dispatch.core.locks import LockTable
from dispatch.core.order import ORDERS
from dispatch.core.placement import NodeSlots, choose_node, fits
from dispatch.core.ranking import RankedQueue
from dispatch.core.spec_state import (
    CANCELLED,
    FAILED,
    FINAL,
    NOT_RUN,
    READY,
    RUNNING,
    SUCCEEDED,
    WAITING,
    Entry,
)


@dataclass
class Assignment:
    task_id: str
    node: str
    attempt: int


class Scheduler(RankedQueue):
    """Ready queue, slot and lock accounting for one project run.

    Args:
        project: the validated project.
        selected: the ids to run; the rest are ignored.
        nodes: the nodes specs may run on.
        retries: default retries per spec (a spec's `retries` wins).
        retry_delay: first retry delay in seconds, doubled per attempt.
        estimates: expected seconds per spec (dispatch/core/durations.py); a spec without one counts as the median
            of the others (1.0 when none is given: then ranks count specs).
        order: "path" (rank first, priority within `PRIORITY_MARGIN`) or "priority" (priority first).
        clock: monotonic clock, injectable for tests.
    """

    def __init__(self, project: Project, selected: set[str], nodes: list[NodeSlots], *, retries: int = 2,
                 retry_delay: float = 2.0, estimates: dict[str, float] | None = None, order: str = "path",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not nodes:
            raise ValueError("no nodes to run on")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.project = project
        self.nodes = {node.name: node for node in nodes}
        self.prefer: dict[str, int] = {}  # node -> slots this run holds there already (set by admission)
        self.locks = LockTable()
        self.retries = retries
        self.retry_delay = retry_delay
        self.clock = clock
        self.order = order
        self.entries = {task_id: Entry() for task_id in project.order if task_id in selected}
        self._init_order(estimates or {})
        self._ready: dict[str, None] = {}  # READY ids (an ordered set)
        self._running: dict[str, None] = {}  # RUNNING ids
        self._exclusive_running = False
        self._dependents = project.dependents()
        self._open = len(self.entries)  # specs not yet in a final state
        self._new_ready: list[str] = []  # became ready since the last unplaceable() check
        for task_id in self.entries:
            self._maybe_ready(task_id)

    # -- queries ---------------------------------------------------------------------------------
    def state(self, task_id: str) -> str:
        return self.entries[task_id].state

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for entry in self.entries.values():
            result[entry.state] = result.get(entry.state, 0) + 1
        return result

    @property
    def done(self) -> bool:
        return self._open == 0

    @property
    def running(self) -> list[str]:
        return list(self._running)

    def due(self) -> int:
        """How many ready specs could start now (no retry delay left): with the running ones, the run's demand."""
        now = self.clock()
        return sum(1 for t in self._ready if self.entries[t].not_before <= now)

    def next_wakeup(self) -> float | None:
        """Clock time of the earliest delayed retry, if any spec is waiting out a retry delay."""
        now = self.clock()
        times = [self.entries[t].not_before for t in self._ready if self.entries[t].not_before > now]
        if self._ready:  # a node another dispatcher filled may take a ready spec once it is asked again
            times += [n.full_until for n in self.nodes.values() if n.full_until > now]
        return min(times, default=None)

    def reason(self, task_id: str) -> str:
        return self.entries[task_id].reason

    def attempts(self, task_id: str) -> int:
        return self.entries[task_id].attempts

    # -- order (the rest is RankedQueue's) ---------------------------------------------------------
    def remaining(self) -> float:
        """Estimated seconds until every open spec has finished: the longest remaining path through
        dependencies and locks, and at least the work left spread over every slot."""
        self._refresh()
        slots = sum(n.slots for n in self.nodes.values() if not (n.down or n.drained)) or 1
        work = sum(self._estimates[t] for t, e in self.entries.items() if e.state in (WAITING, READY))
        return max(max(self._rank.values(), default=0.0), work / slots)

    # -- transitions -----------------------------------------------------------------------------
    def _deps_done(self, task_id: str) -> bool:
        return all(self.entries[d].state == SUCCEEDED if d in self.entries else True
                   for d in self.project.specs[task_id].depends_on)

    def _maybe_ready(self, task_id: str) -> None:
        entry = self.entries[task_id]
        if entry.state == WAITING and self._deps_done(task_id):
            entry.state, entry.ready_at = READY, time.time()
            self._ready[task_id] = None
            self._new_ready.append(task_id)

    def _fits(self, task_id: str, node: NodeSlots) -> bool:
        return fits(self.project.specs[task_id], node)

    def _place(self, task_id: str) -> NodeSlots | None:
        return choose_node(self.project.specs[task_id], self.nodes.values(), self.entries[task_id].avoid, self.clock(),
                           self.prefer)

    def set_drained(self, names: set[str]) -> bool:
        """Mark exactly `names` drained (unknown names are ignored); returns whether anything changed."""
        changed = False
        for node in self.nodes.values():
            drained = node.name in names
            changed = changed or node.drained != drained
            node.drained = drained
        return changed

    def drained_waiting(self) -> dict[str, list[str]]:
        """Ready specs that wait only because every node that fits them is drained: id -> those nodes."""
        if not any(n.drained for n in self.nodes.values()):
            return {}
        waiting = {}
        for task_id in self._ready:
            fitting = [n for n in self.nodes.values() if self._fits(task_id, n)]
            if fitting and all(n.drained for n in fitting):
                waiting[task_id] = [n.name for n in fitting]
        return waiting

    def placeable(self, task_id: str) -> bool:
        """Whether any node could ever run this spec (its `node`/`labels`/models fit)."""
        return any(self._fits(task_id, n) for n in self.nodes.values())

    def pick(self) -> list[Assignment]:
        """Take every ready spec that can start now, in order, with its node slot and locks."""
        assignments = self._pick(hold=True)
        if not assignments and not self.running:  # a hold waits on something that will not come: none then
            assignments = self._pick(hold=False)
        return assignments

    def _pick(self, hold: bool) -> list[Assignment]:
        assignments: list[Assignment] = []
        now = self.clock()
        if self._exclusive_running or not any(n.free > 0 for n in self.nodes.values()):
            return assignments
        candidates = [t for t in self._ready if self.entries[t].not_before <= now]
        startable: dict[str, float | None] = {}  # per pick: when a spec a hold would wait for can start
        if self._stale >= self._refresh_every:
            self._refresh()
        end = self._promotion_end(candidates)
        for task_id in self._ordered(candidates, end):
            if not any(n.free > 0 for n in self.nodes.values()):
                break
            entry = self.entries[task_id]
            spec = self.project.specs[task_id]
            if spec.exclusive and self.running:
                break  # drain: nothing new starts until the exclusive spec has run
            node = self._place(task_id)
            if node is None or (spec.modifies and self.locks.blockers(task_id, spec.modifies)):
                continue
            if hold and spec.modifies and self._hold(task_id, now, startable, end):
                continue
            self.locks.try_acquire(task_id, spec.modifies)
            node.used += 1
            if self.prefer.get(node.name):
                self.prefer[node.name] -= 1
            del self._ready[task_id]
            entry.state, entry.node, entry.started = RUNNING, node.name, now
            self._running[task_id] = None
            entry.attempts += 1
            self._stale += 1
            assignments.append(Assignment(task_id, node.name, entry.attempts))
            if spec.exclusive:
                self._exclusive_running = True
                break
        return assignments

    def node_full(self, name: str, seconds: float) -> None:
        """Another dispatcher holds every slot of `name` (its broker said so): place nothing there for
        `seconds`, so the specs refused there go to the nodes that have room, not wait for this one."""
        self.nodes[name].full_until = self.clock() + seconds

    def set_aside(self, name: str) -> bool:
        """Whether `node_full` still keeps specs off `name`."""
        return self.nodes[name].full_until > self.clock()

    def unpick(self, assignment: Assignment, delay: float = 0.0) -> None:
        """Give back an assignment that could not start (e.g. the machine's slots were taken)."""
        self._release(assignment.task_id)
        entry = self.entries[assignment.task_id]
        entry.state, entry.attempts = READY, entry.attempts - 1
        entry.not_before = self.clock() + delay
        self._ready[assignment.task_id] = None

    def _release(self, task_id: str) -> None:
        self._running.pop(task_id, None)
        entry = self.entries[task_id]
        if entry.node is not None and entry.node in self.nodes:
            self.nodes[entry.node].used -= 1
        self.locks.release(task_id)
        if self.project.specs[task_id].exclusive:
            self._exclusive_running = False

    def adopt(self, task_id: str, node: str, attempt: int) -> None:
        """Count a spec already running (re-attached after a restart) as running on `node`."""
        entry = self.entries[task_id]
        if entry.state in (WAITING, READY):  # its dependencies finished in the earlier run
            self._ready.pop(task_id, None)
            entry.state, entry.node, entry.attempts, entry.started = RUNNING, node, attempt, self.clock()
            self._running[task_id] = None
            self.nodes[node].used += 1
            self.locks.try_acquire(task_id, self.project.specs[task_id].modifies)
            if self.project.specs[task_id].exclusive:
                self._exclusive_running = True

    def succeed(self, task_id: str) -> None:
        """Mark a running (or ready, for cache hits found before dispatch) spec succeeded."""
        entry = self.entries[task_id]
        if entry.state == RUNNING:
            self._release(task_id)
        self._finalize(task_id, SUCCEEDED)
        for child in self._children(task_id):
            self._maybe_ready(child)

    def _children(self, task_id: str) -> list[str]:
        return [c for c in self._dependents[task_id] if c in self.entries]

    def fail(self, task_id: str, reason: str, *, retryable: bool = True, node_fault: bool = False,
             max_attempts: int | None = None) -> list[str]:
        """Record a failed attempt: requeue it with backoff, or fail it and skip its dependents.

        Args:
            reason: why it failed, shown in status and the report.
            retryable: False for deterministic failures that a retry cannot fix.
            node_fault: the node was at fault; the retry prefers another node.
            max_attempts: a lower cap for this failure (e.g. 2 for failed acceptance checks).

        Returns:
            The ids now marked not run because of this failure (empty when it will retry).
        """
        entry = self.entries[task_id]
        if entry.state == RUNNING:
            self._release(task_id)
        spec = self.project.specs[task_id]
        allowed = 1 + (spec.retries if spec.retries is not None else self.retries)
        if max_attempts is not None:
            allowed = min(allowed, max_attempts)
        if node_fault and entry.node:
            entry.avoid.add(entry.node)
        entry.reason = reason
        if retryable and entry.attempts < allowed:
            entry.state = READY
            entry.not_before = self.clock() + self.retry_delay * 2 ** (entry.attempts - 1)
            self._ready[task_id] = None
            return []
        self._finalize(task_id, FAILED, reason)
        return self._skip_dependents(task_id, f"dependency {task_id} failed")

    def _skip_dependents(self, task_id: str, reason: str) -> list[str]:
        skipped: list[str] = []
        stack = self._children(task_id)
        while stack:
            child = stack.pop()
            entry = self.entries[child]
            if entry.state in (WAITING, READY):
                self._finalize(child, NOT_RUN, reason)
                skipped.append(child)
                stack.extend(self._children(child))
        return skipped

    def cancel_all(self, reason: str) -> list[str]:
        """Stop: every spec not yet final and not running becomes cancelled."""
        cancelled = []
        for task_id, entry in self.entries.items():
            if entry.state in (WAITING, READY):
                self._finalize(task_id, CANCELLED, reason)
                cancelled.append(task_id)
        return cancelled

    def cancel_running(self, task_id: str, reason: str) -> None:
        entry = self.entries[task_id]
        if entry.state == RUNNING:
            self._release(task_id)
        self._finalize(task_id, CANCELLED, reason)

    def unplaceable(self) -> list[str]:
        """Specs that became ready since the last call and that no node can ever run (fail them: no hang)."""
        fresh, self._new_ready = self._new_ready, []
        return [t for t in dict.fromkeys(fresh) if self.entries[t].state == READY and not self.placeable(t)]

    def _finalize(self, task_id: str, state: str, reason: str = "") -> None:
        entry = self.entries[task_id]
        if entry.state not in FINAL:
            self._open -= 1
        entry.state, entry.reason = state, reason
        self._ready.pop(task_id, None)
