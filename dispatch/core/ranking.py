"""The ready queue's order as a run goes on: duration estimates, ranks, the priority rule and holds.

The rank of each open spec (dispatch/core/order.py) is recomputed from the estimates as specs start and
estimates change; ready specs are taken by rank, `priority` moving a spec ahead only where the estimates say
that costs the project at most `PRIORITY_MARGIN` of its length. A ready spec may also be held back from a file
that a spec ahead of it in the order will want before this one would end, when the estimates say the project
ends sooner that way. `RankedQueue` is the part of `Scheduler` (dispatch/core/scheduler.py) that does this.
"""

from __future__ import annotations

from collections.abc import Callable

from dispatch.core.dag import Project
from dispatch.core.locks import LockTable
from dispatch.core.order import LockGroups, compute_ranks, goes_ahead, hold_pays, promote_by_priority
from dispatch.core.spec_state import FINAL, READY, RUNNING, SUCCEEDED, WAITING, Entry

PRIORITY_MARGIN = 0.02
"""A spec of better `priority` goes ahead of a higher-ranked ready spec B only when B's slack (how much sooner
than the project's estimated end B's own remaining path ends) plus this share of the project's estimated
length covers the ahead-goer's estimated duration, i.e. the wait it can cause B. So by the estimates, each
priority decision lengthens the project by at most 2 % of it. Without estimates that tell the open specs apart
(a project's first run: none, then the project's median for every spec not yet run) slack cannot be judged,
and priority only breaks ties of rank."""


class RankedQueue:
    """The order of a scheduler's ready specs. `Scheduler` holds the run's state it reads (annotated below) and
    calls `_init_order` with the first estimates once its entries exist."""

    project: Project
    entries: dict[str, Entry]
    locks: LockTable
    order: str
    clock: Callable[[], float]
    _running: dict[str, None]

    def _init_order(self, estimates: dict[str, float]) -> None:
        self._position = {task_id: index for index, task_id in enumerate(self.project.order)}
        self._groups = LockGroups(self.project, self.entries)
        self._estimates: dict[str, float] = {}
        self._rank: dict[str, float] = {}
        self._chain: dict[str, float] = {}
        self._margin = 0.0  # PRIORITY_MARGIN of the project's first estimated length, in seconds
        self._measured = False  # the estimates tell open specs apart (else slack means nothing: priority ties only)
        self._stale = 0  # starts and estimate changes since the ranks were computed
        self._refreshed_at = 0.0
        self._refresh_every = max(1, len(self.entries) // 50)  # a recompute is O(specs + dependencies)
        self.set_estimates(estimates)

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
