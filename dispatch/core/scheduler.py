"""The in-flow ready queue: which spec runs next, on which node, and what a finished spec unblocks.

Prefect-free and clock-injected so it can be tested alone. The project flow asks `pick()` for work
whenever something changes (a spec finished, a retry delay ran out) and tells `finish()` how each
spec ended. Nothing here blocks or polls: the flow dispatches the next spec the moment one ends.

Order (dispatch/core/order.py): by how much the project waits on the spec, its rank: the longest remaining path
through dependencies and file locks, by estimated durations. `priority` then moves a spec ahead of a
higher-ranked one only where the estimates say that costs the project at most `PRIORITY_MARGIN` of its
length (below); `order="priority"` (projects.json `order: priority`) keeps strict priority first, rank second.
A spec starts only with a free slot on a node that fits it and every file lock it needs, taken
together (no hold-and-wait). An `exclusive` spec runs with nothing else of its project; when it is
first in line, nothing new starts until it has run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatch.core.dag import Project
from dispatch.core.locks import LockTable
from dispatch.core.order import ORDERS, LockGroups, compute_ranks, goes_ahead, hold_pays, promote_by_priority

WAITING, READY, RUNNING = "waiting", "ready", "running"
SUCCEEDED, FAILED, NOT_RUN, CANCELLED = "succeeded", "failed", "not_run", "cancelled"
FINAL = (SUCCEEDED, FAILED, NOT_RUN, CANCELLED)

PRIORITY_MARGIN = 0.02
"""A spec of better `priority` goes ahead of a higher-ranked ready spec B only when B's slack (how much sooner
than the project's estimated end B's own remaining path ends) plus this share of the project's estimated
length covers the ahead-goer's estimated duration, i.e. the wait it can cause B. So by the estimates, each
priority decision lengthens the project by at most 2 % of it. Without estimates that tell the open specs apart
(a project's first run: none, then the project's median for every spec not yet run) slack cannot be judged,
and priority only breaks ties of rank."""


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
    started: float = 0.0  # clock time of the current attempt's start


class Scheduler:
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
        self.locks = LockTable()
        self.retries = retries
        self.retry_delay = retry_delay
        self.clock = clock
        self.order = order
        self.entries = {task_id: _Entry() for task_id in project.order if task_id in selected}
        self._position = {task_id: index for index, task_id in enumerate(project.order)}
        self._groups = LockGroups(project, self.entries)
        self._estimates: dict[str, float] = {}
        self._rank: dict[str, float] = {}
        self._chain: dict[str, float] = {}
        self._margin = 0.0  # PRIORITY_MARGIN of the project's first estimated length, in seconds
        self._measured = False  # the estimates tell open specs apart (else slack means nothing: priority ties only)
        self._stale = 0  # starts and estimate changes since the ranks were computed
        self._refreshed_at = 0.0
        self._refresh_every = max(1, len(self.entries) // 50)  # a recompute is O(specs + dependencies)
        self.set_estimates(estimates or {})
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

    # -- order -----------------------------------------------------------------------------------
    def set_estimates(self, estimates: dict[str, float]) -> None:
        """Take new duration estimates (seconds per id; the others count as their median); ranks follow."""
        known = {t: max(float(v), 0.0) for t, v in estimates.items() if t in self.entries}
        values = sorted(known.values())
        default = values[len(values) // 2] if values else 1.0
        changed = {t: known.get(t, default) for t in self.entries}
        # Slack can be judged only where the estimates tell the open specs apart. A project's first run gives
        # every spec not yet run the project's median: one number for all, with real durations 1-4 x apart,
        # and the priority rule then moved specs ahead on slack that was not there (standard seed 2 of
        # bench/policy_sim.py: 1.050 x the bound against 1.000 without it).
        self._measured = len({v for t, v in changed.items() if self.entries[t].state not in FINAL}) > 1
        if changed != self._estimates:
            self._estimates = changed
            self._refresh()

    def estimate(self, task_id: str) -> float:
        """The spec's estimated duration in seconds."""
        return self._estimates[task_id]

    def rank(self, task_id: str) -> float:
        """The spec's rank: its longest remaining path through dependencies and file locks (estimated seconds)."""
        return self._rank.get(task_id, 0.0)

    def _refresh(self) -> None:
        """Recompute every open spec's rank from the estimates, with running specs' elapsed time taken off."""
        now = self.clock()
        open_ids = {t for t, e in self.entries.items() if e.state not in FINAL}
        not_started = {t for t in open_ids if self.entries[t].state != RUNNING}
        remaining = {t: (self._estimates[t] if t in not_started
                         else max(self._estimates[t] - (now - self.entries[t].started), 0.0)) for t in open_ids}
        self._rank, self._chain = compute_ranks(self.project, open_ids, not_started, remaining, self._groups)
        if not self._margin and self._rank:
            self._margin = PRIORITY_MARGIN * max(self._rank.values())
        self._stale = 0
        self._refreshed_at = now

    def remaining(self) -> float:
        """Estimated seconds until every open spec has finished: the longest remaining path through
        dependencies and locks, and at least the work left spread over every slot."""
        self._refresh()
        slots = sum(n.slots for n in self.nodes.values() if not (n.down or n.drained)) or 1
        work = sum(self._estimates[t] for t, e in self.entries.items() if e.state in (WAITING, READY))
        return max(max(self._rank.values(), default=0.0), work / slots)

    def _key(self, task_id: str) -> tuple:
        rank = (-self._rank.get(task_id, 0.0), -self._chain.get(task_id, 0.0))
        priority = self.project.specs[task_id].priority
        if self.order == "priority":
            return (priority, *rank, self._position[task_id])
        return (*rank, priority, self._position[task_id])

    def _promotion_end(self, candidates: list[str]) -> float | None:
        """The project's estimated remaining length that the priority rule weighs slack against; None when the
        rule is off (strict priority order, or no measured durations: slack cannot be judged)."""
        if self.order == "priority" or not self._measured or not candidates:
            return None
        elapsed = self.clock() - self._refreshed_at  # running specs have come that much closer to their end
        running = [max(self._rank.get(t, 0.0) - elapsed, 0.0) for t in self._running]
        return max([*(self._rank[t] for t in candidates), *running])

    def _ordered(self, candidates: list[str], end: float | None) -> list[str]:
        """Candidates by rank; a spec of better priority moves ahead of one whose slack covers its duration."""
        candidates.sort(key=self._key)
        if end is None or len(candidates) < 2:
            return candidates  # without measured durations no slack can be judged: priority only breaks ties
        priority = {t: self.project.specs[t].priority for t in candidates}
        return promote_by_priority(candidates, priority, self._estimates, self._rank, end, self._margin)

    def _expected_end(self, task_id: str, now: float) -> float:
        entry = self.entries[task_id]
        return max(now, entry.started + self._estimates[task_id])

    def _startable_at(self, task_id: str, now: float, further: bool = True) -> float | None:
        """When a spec can start by the estimates, if it waits only on running or ready specs (dependencies,
        holders of its files) or, with `further`, on waiting dependencies that do; None when it waits on
        anything further off, or on nothing (it could start now). One waiting level, not the whole way up:
        looking without limit held a ready spec for one arrival after another while shorter ones took its
        file, and a 5,000-spec project ended 0.8 % later; a deeper walk would also cost time per pick."""
        entry = self.entries[task_id]
        if entry.state not in (WAITING, READY):
            return None
        times = []
        for dep in self.project.specs[task_id].depends_on:
            state = self.entries[dep].state if dep in self.entries else SUCCEEDED
            if state == RUNNING:
                times.append(self._expected_end(dep, now))
            elif state == READY and self.entries[dep].not_before <= now:  # about to start (this very pick)
                times.append(now + self._estimates[dep])
            elif state == WAITING and further:
                at = self._startable_at(dep, now, further=False)
                if at is None:
                    return None
                times.append(at + self._estimates[dep])
            elif state != SUCCEEDED:
                return None
        holders = self.locks.blockers(task_id, self.project.specs[task_id].modifies)
        times += [self._expected_end(holder, now) for holder in holders]
        return max(times) if times else None

    def _hold(self, task_id: str, now: float, startable: dict[str, float | None], end: float | None) -> bool:
        """Whether to leave a ready spec's files free for a spec ahead of it in the order (`_key`: with
        `order="priority"`, priority first) that will want one of them before this one would end: when, by the
        estimates, the project ends sooner that way. A spec that the priority rule would move ahead of the other
        anyway (`end`: see `_promotion_end`) does not wait for it: it would take the file first once both are
        ready, and the wait would be lost."""
        own, rank, chain = self._estimates[task_id], self._rank[task_id], self._chain[task_id]
        key = self._key(task_id)
        priority = self.project.specs[task_id].priority
        for entry in self._groups.entries_of[task_id]:
            for other in self._groups.members[entry]:
                if other == task_id or self._key(other) >= key:
                    continue
                if other not in startable:
                    startable[other] = self._startable_at(other, now)
                at = startable[other]
                if at is None or at >= now + own:
                    continue
                if end is not None and goes_ahead(priority, own, self.project.specs[other].priority,
                                                  self._rank[other], end - (at - now), self._margin):
                    continue
                if hold_pays(now, own, rank, chain, at, self._estimates[other], self._rank[other],
                             self._chain[other]):
                    return True
        return False

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
        now = self.clock()
        free = [n for n in healthy if n.free > 0 and n.full_until <= now]
        if not free:
            return None
        return max(free, key=lambda n: (n.free, -n.priority, n.name))

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
