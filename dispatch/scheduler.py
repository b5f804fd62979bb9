"""The in-flow ready queue: which spec runs next, on which node, and what a finished spec unblocks.

Prefect-free and clock-injected so it can be tested alone. The project flow asks `pick()` for work
whenever something changes (a spec finished, a retry delay ran out) and tells `finish()` how each
spec ended. Nothing here blocks or polls: the flow dispatches the next spec the moment one ends.

Order: `priority` (1 first), then the longest remaining dependency chain, then file order.
A spec starts only with a free slot on a node that fits it and every file lock it needs, taken
together (no hold-and-wait). An `exclusive` spec runs with nothing else of its project; when it is
first in line, nothing new starts until it has run.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatch.dag import Project
from dispatch.locks import LockTable

WAITING, READY, RUNNING = "waiting", "ready", "running"
SUCCEEDED, FAILED, NOT_RUN, CANCELLED = "succeeded", "failed", "not_run", "cancelled"
FINAL = (SUCCEEDED, FAILED, NOT_RUN, CANCELLED)


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

    @property
    def free(self) -> int:
        return 0 if self.down else self.slots - self.used


@dataclass
class Assignment:
    task_id: str
    node: str
    attempt: int


@dataclass
class _Entry:
    state: str = WAITING
    attempts: int = 0
    node: str | None = None
    not_before: float = 0.0
    reason: str = ""
    avoid: set[str] = field(default_factory=set)
    ready_at: float | None = None  # wall-clock time it last became ready (for latency figures)


class Scheduler:
    """Ready queue, slot and lock accounting for one project run.

    Args:
        project: the validated project.
        selected: the ids to run; the rest are ignored.
        nodes: the nodes specs may run on.
        retries: default retries per spec (a spec's `retries` wins).
        retry_delay: first retry delay in seconds, doubled per attempt.
        weights: expected seconds per spec for the critical-path order (1.0 each when unknown).
        done: ids already finished in this run (e.g. re-attached results); they count as succeeded.
        clock: monotonic clock, injectable for tests.
    """

    def __init__(self, project: Project, selected: set[str], nodes: list[NodeSlots], *, retries: int = 2,
                 retry_delay: float = 2.0, weights: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not nodes:
            raise ValueError("no nodes to run on")
        self.project = project
        self.nodes = {node.name: node for node in nodes}
        self.locks = LockTable()
        self.retries = retries
        self.retry_delay = retry_delay
        self.clock = clock
        self.entries = {task_id: _Entry() for task_id in project.order if task_id in selected}
        chain = project.critical_path(weights)
        position = {task_id: index for index, task_id in enumerate(project.order)}
        self._key = {task_id: (project.specs[task_id].priority, -chain[task_id], position[task_id])
                     for task_id in self.entries}
        self._heap: list[tuple[tuple[int, float, int], str]] = []
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
        return [task_id for task_id, entry in self.entries.items() if entry.state == RUNNING]

    def next_wakeup(self) -> float | None:
        """Clock time of the earliest delayed retry, if any spec is waiting out a retry delay."""
        now = self.clock()
        times = [self.entries[t].not_before for _, t in self._heap
                 if self.entries[t].state == READY and self.entries[t].not_before > now]
        return min(times, default=None)

    def reason(self, task_id: str) -> str:
        return self.entries[task_id].reason

    def attempts(self, task_id: str) -> int:
        return self.entries[task_id].attempts

    # -- transitions -----------------------------------------------------------------------------
    def _deps_done(self, task_id: str) -> bool:
        return all(self.entries[d].state == SUCCEEDED if d in self.entries else True
                   for d in self.project.specs[task_id].depends_on)

    def _maybe_ready(self, task_id: str) -> None:
        entry = self.entries[task_id]
        if entry.state == WAITING and self._deps_done(task_id):
            entry.state, entry.ready_at = READY, time.time()
            heapq.heappush(self._heap, (self._key[task_id], task_id))
            self._new_ready.append(task_id)

    def _fits(self, task_id: str, node: NodeSlots) -> bool:
        spec = self.project.specs[task_id]
        if spec.node is not None and spec.node != node.name:
            return False
        if not set(spec.labels) <= node.labels:
            return False
        if node.models is not None and spec.kind == "agent" and not set(spec.model_chain) & node.models:
            return False
        return True

    def _place(self, task_id: str) -> NodeSlots | None:
        entry = self.entries[task_id]
        fitting = [n for n in self.nodes.values() if self._fits(task_id, n)]
        # A retry after a node fault waits for a healthy node rather than go back to the faulty one,
        # unless no other node can run it at all.
        healthy = [n for n in fitting if n.name not in entry.avoid] or fitting
        free = [n for n in healthy if n.free > 0]
        if not free:
            return None
        return max(free, key=lambda n: (n.free, -n.priority, n.name))

    def placeable(self, task_id: str) -> bool:
        """Whether any node could ever run this spec (its `node`/`labels`/models fit)."""
        return any(self._fits(task_id, n) for n in self.nodes.values())

    def pick(self) -> list[Assignment]:
        """Take every ready spec that can start now, in order, with its node slot and locks."""
        assignments: list[Assignment] = []
        deferred: list[tuple[tuple[int, float, int], str]] = []
        now = self.clock()
        while self._heap and any(n.free > 0 for n in self.nodes.values()):
            item = heapq.heappop(self._heap)
            task_id = item[1]
            entry = self.entries[task_id]
            if entry.state != READY:
                continue
            spec = self.project.specs[task_id]
            if entry.not_before > now:
                deferred.append(item)
                continue
            if self._exclusive_running:
                deferred.append(item)
                break
            if spec.exclusive and self.running:
                deferred.append(item)
                break  # drain: nothing new starts until the exclusive spec has run
            node = self._place(task_id)
            if node is None or not self.locks.try_acquire(task_id, spec.modifies):
                deferred.append(item)
                continue
            node.used += 1
            entry.state, entry.node = RUNNING, node.name
            entry.attempts += 1
            if spec.exclusive:
                self._exclusive_running = True
            assignments.append(Assignment(task_id, node.name, entry.attempts))
        for item in deferred:
            heapq.heappush(self._heap, item)
        return assignments

    def unpick(self, assignment: Assignment, delay: float = 0.0) -> None:
        """Give back an assignment that could not start (e.g. the machine's slots were taken)."""
        self._release(assignment.task_id)
        entry = self.entries[assignment.task_id]
        entry.state, entry.attempts = READY, entry.attempts - 1
        entry.not_before = self.clock() + delay
        heapq.heappush(self._heap, (self._key[assignment.task_id], assignment.task_id))

    def _release(self, task_id: str) -> None:
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
            entry.state, entry.node, entry.attempts = RUNNING, node, attempt
            self.nodes[node].used += 1
            self.locks.try_acquire(task_id, self.project.specs[task_id].modifies)
            if self.project.specs[task_id].exclusive:
                self._exclusive_running = True

    def succeed(self, task_id: str) -> None:
        """Mark a running (or ready, for cache hits found before dispatch) spec succeeded."""
        entry = self.entries[task_id]
        if entry.state == RUNNING:
            self._release(task_id)
        self._finalize(entry, SUCCEEDED)
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
            heapq.heappush(self._heap, (self._key[task_id], task_id))
            return []
        self._finalize(entry, FAILED, reason)
        return self._skip_dependents(task_id, f"dependency {task_id} failed")

    def _skip_dependents(self, task_id: str, reason: str) -> list[str]:
        skipped: list[str] = []
        stack = self._children(task_id)
        while stack:
            child = stack.pop()
            entry = self.entries[child]
            if entry.state in (WAITING, READY):
                self._finalize(entry, NOT_RUN, reason)
                skipped.append(child)
                stack.extend(self._children(child))
        return skipped

    def cancel_all(self, reason: str) -> list[str]:
        """Stop: every spec not yet final and not running becomes cancelled."""
        cancelled = []
        for task_id, entry in self.entries.items():
            if entry.state in (WAITING, READY):
                self._finalize(entry, CANCELLED, reason)
                cancelled.append(task_id)
        return cancelled

    def cancel_running(self, task_id: str, reason: str) -> None:
        entry = self.entries[task_id]
        if entry.state == RUNNING:
            self._release(task_id)
        self._finalize(entry, CANCELLED, reason)

    def unplaceable(self) -> list[str]:
        """Specs that became ready since the last call and that no node can ever run (fail them: no hang)."""
        fresh, self._new_ready = self._new_ready, []
        return [t for t in dict.fromkeys(fresh) if self.entries[t].state == READY and not self.placeable(t)]

    def _finalize(self, entry: _Entry, state: str, reason: str = "") -> None:
        if entry.state not in FINAL:
            self._open -= 1
        entry.state, entry.reason = state, reason
