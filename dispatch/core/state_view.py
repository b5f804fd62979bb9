"""The state view: a project run's rows (`dispatch status`, the report), derived from its scheduler.

A row's state, reason for a final state, node, and when it became ready are the scheduler's
(dispatch/core/scheduler.py); the view adds only what the scheduler does not know: the task run of the latest
attempt and when it was submitted, the model it started with, the last result's figures, the usage of every
attempt, and a word on a spec while it waits or runs (a budget, a cool-down, a lock, a drained node, an agent
CLI's retry note). `row()` puts them together when the state file is written, so no row is kept by hand.

Row states: the scheduler's final states (succeeded, failed, not_run, cancelled), `running` once the current
attempt's task run is submitted, `retrying` after a failed attempt, `ready` after a node refused an attempt
(nothing ran), else `waiting`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from dispatch.core.results import ProjectState, SpecResult, SpecRow
from dispatch.core.scheduler import Scheduler
from dispatch.core.spec_state import FINAL, RUNNING


@dataclass
class _Facts:
    """What the dispatcher knows of one spec beyond its scheduler entry."""

    submitted: int = 0  # the attempt whose task run was submitted last (0: none yet)
    live: bool = False  # that task run has not ended yet
    note: str | None = None  # the latest word on it while it waits or runs; None: say the scheduler's reason
    refused: bool = False  # its node refused the last attempt (nothing ran)
    task_run_id: str | None = None
    dispatched_at: float | None = None
    ended_at: float | None = None
    model: str = ""
    result: SpecResult | None = None  # of its latest attempt that ran
    cached: bool = False
    fallback: str = ""
    spent: SpecRow = field(default_factory=lambda: SpecRow(state=""))  # usage of every attempt (add_usage)

    @property
    def reason(self) -> str:
        """The word shown while it waits (what `RunDrain.note_waits` reads and sets)."""
        return self.note or ""

    @reason.setter
    def reason(self, value: str) -> None:
        self.note = value


class StateView:
    """The rows of a run's selected specs, kept by events and derived from `scheduler`.

    Args:
        scheduler: the run's scheduler (its entries are the selected specs, in project order).
        header: the run's state file without rows (project, run id, user, nodes, ...).
    """

    def __init__(self, scheduler: Scheduler, header: ProjectState) -> None:
        self.scheduler = scheduler
        self.header = header
        self._facts = {task_id: _Facts() for task_id in scheduler.entries}

    # -- events ------------------------------------------------------------------------------------
    def started(self, task_id: str, attempt: int, *, model: str, task_run_id: str, at: float) -> None:
        """Its attempt `attempt` was submitted as task run `task_run_id`, starting with `model`."""
        facts = self._facts[task_id]
        if self.state(task_id) != "retrying":  # why it waited is over; a retry keeps why it failed
            facts.note = ""
        else:
            facts.note = None
        facts.submitted, facts.live, facts.refused, facts.task_run_id = attempt, True, False, task_run_id
        facts.dispatched_at, facts.model = at, model

    def ended(self, task_id: str, result: SpecResult, *, cached: bool, at: float) -> None:
        """Its attempt ran and gave `result` (`cached`: a result of an earlier run, taken from the cache)."""
        facts = self._facts[task_id]
        facts.live, facts.note, facts.result, facts.cached = False, None, result, cached
        facts.fallback, facts.ended_at, facts.model = result.fallback(), at, result.model
        if not cached:
            facts.spent.add_usage(result.attempts)

    def refused(self, task_id: str, reason: str) -> None:
        """Its node refused the attempt before anything ran (its own slots were full)."""
        facts = self._facts[task_id]
        facts.live, facts.note, facts.refused = False, reason, True

    def waiting(self, task_id: str, reason: str) -> bool:
        """It waits for `reason`; whether that is news (its row said something else)."""
        news = self.reason(task_id) != reason
        self._facts[task_id].note = reason
        return news

    def note(self, task_id: str, note: str) -> None:
        """A running spec's note ("glm: 429, retrying 2/10"; '' once it goes on); ignored when not running."""
        if self.state(task_id) == "running":
            self._facts[task_id].note = note

    def skipped(self, task_id: str, task_run_id: str) -> None:
        """A spec not run is shown as task run `task_run_id` (a `skip_spec` run)."""
        self._facts[task_id].task_run_id = task_run_id

    # -- derived -----------------------------------------------------------------------------------
    def state(self, task_id: str) -> str:
        entry = self.scheduler.entries[task_id]
        if entry.state in FINAL:
            return entry.state
        facts = self._facts[task_id]
        if entry.state == RUNNING and facts.live:
            return "running"
        if facts.refused:
            return "ready"
        ran = entry.attempts - (entry.state == RUNNING)  # a spec asking for its locks has not started yet
        return "retrying" if ran > 0 else "waiting"

    def reason(self, task_id: str) -> str:
        """Why it ended (the scheduler's), else the latest word on it, else why its last attempt failed when it
        is retrying (the scheduler's)."""
        entry = self.scheduler.entries[task_id]
        if entry.state in FINAL:
            return entry.reason
        if (note := self._facts[task_id].note) is not None:
            return note
        return entry.reason if self.state(task_id) in ("retrying", "running") else ""

    def row(self, task_id: str) -> SpecRow:
        entry = self.scheduler.entries[task_id]
        facts, result = self._facts[task_id], self._facts[task_id].result
        cached = facts.cached and result is not None
        spent = facts.spent
        return SpecRow(
            state=self.state(task_id), reason=self.reason(task_id), attempts=facts.submitted,
            node=(result.node if cached else entry.node or "") if facts.submitted else "",
            ready_at=entry.ready_at if facts.submitted else None, dispatched_at=facts.dispatched_at,
            started_at=result.started_at if cached else facts.dispatched_at,
            ended_at=result.ended_at if cached else facts.ended_at,
            model=facts.model, duration=result.duration if result else None, cached=facts.cached,
            exit_code=result.exit_code if result else None, log_path=result.log_path if result else "",
            fallback=facts.fallback, task_run_id=facts.task_run_id,
            cost_usd=spent.cost_usd, input_tokens=spent.input_tokens, output_tokens=spent.output_tokens,
            attempts_without_cost=spent.attempts_without_cost)

    def rows(self) -> dict[str, SpecRow]:
        return {task_id: self.row(task_id) for task_id in self._facts}

    @property
    def waits(self) -> dict[str, _Facts]:
        """Each spec's word while it waits, by task id (objects with a settable `reason`)."""
        return self._facts

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.state(task_id) for task_id in self._facts))

    def progress(self, seconds_left: float | None) -> dict:
        """Counts for the progress view, with the estimated seconds left (None until something was measured)."""
        counts = self.counts()
        return {"total": len(self._facts), "done": sum(counts.get(s, 0) for s in FINAL),
                "running": counts.get("running", 0), "failed": counts.get("failed", 0) + counts.get("not_run", 0),
                "remaining_s": seconds_left}

    def conclude(self, *, stopped: bool) -> str:
        """Set the run's end in the header (cancelled when `stopped`, failed when a spec failed or was not run,
        else completed) and return its summary."""
        counts, total = self.counts(), len(self._facts)
        failed = counts.get("failed", 0)
        summary = (f"{counts.get('succeeded', 0)}/{total} succeeded, {failed} failed, "
                   f"{counts.get('not_run', 0)} not run, {counts.get('cancelled', 0)} cancelled")
        state = "cancelled" if stopped else "failed" if failed or counts.get("not_run") else "completed"
        self.header.state, self.header.message, self.header.ended_at = state, summary, time.time()
        return summary

    def snapshot(self, **header: object) -> ProjectState:
        """The state file now: the header (updated by `header`) with the nodes' used slots and every row derived."""
        nodes = {name: {**self.header.nodes.get(name, {}), "used": node.used}
                 for name, node in self.scheduler.nodes.items()}
        return self.header.model_copy(update={**header, "nodes": nodes, "specs": self.rows()})
