"""Admission: whether a spec the scheduler picked starts now, and what it holds while it runs.

The scheduler (dispatch/core/scheduler.py) picks specs by its own count of slots and locks. Before a pick
becomes a task run it passes, in this order: this run's fair share of the cluster's slots (shares.py), the
models' cool-downs (cooldowns.py), the daily budgets (budgets.py), the node's slot in every dispatcher's count
(brokers.py) and, in team mode, the server's file locks. The first check that refuses gives back what the
earlier ones took, by one path (`_give_back`): the lock grant, then the slot, then the pick itself
(`Scheduler.unpick`), so no spec holds a slot while it waits for anything (no hold-and-wait). A server slot
given back is parked a moment for this run's next spec on its node (a handoff without a server call), and
counted against the share until it is taken or released (`_within_share`).

A new server slot and the server locks are asked off the dispatch loop (an HTTP round trip each): `admit`
hands the request to a small thread pool (the new slots a round wants of one node in one request: one lease
for a burst of starts) and the answer comes back through `post("locks", (task_id,
answer))`, which the loop feeds to `locks_answered`; the loop never waits on the server. What a started
spec holds (its slot, its lock grant, the model it started with for budget estimates) is kept here until
`ended` gives it back.

Prefect-free: the server lock table is anything with `try_acquire(task_id, patterns)` and `release(token)`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dispatch.core.scheduler import Assignment, Scheduler
from dispatch.core.spec_state import READY, WAITING
from dispatch.core.usage import next_utc_midnight

if TYPE_CHECKING:
    from dispatch.core.brokers import Brokers
    from dispatch.core.budgets import Budgets
    from dispatch.core.cooldowns import Cooldowns
    from dispatch.core.shares import FairShare
    from dispatch.core.specs import Spec

logger = logging.getLogger(__name__)

BUSY_RETRY = 0.2  # seconds before asking again for a node whose slots another dispatcher holds
SHARE_RETRY = 0.2  # seconds before a run over its fair share of the slots looks again
_LOCK_RETRY = 0.2  # seconds before a spec whose lock request broke asks again (jittered up to twice that)
_BUDGET_LOOK = 60.0  # a spec held back by a budget looks again this often (another dispatcher's spend, a new day)
_ASKERS = 6  # helper threads asking the server for slots and locks (round trips in flight at once)
_COOLDOWN_LOOK = 300.0  # ... by cool-downs: at their first reset, at most this long


class LockAnswer(Protocol):
    """A server lock table's answer: true when granted (then `token` gives it back), else why not."""

    token: str | None
    retry_after: float

    def __bool__(self) -> bool: ...

    @property
    def reason(self) -> str: ...


class LockServer(Protocol):
    """The server's file lock table shared with other users' runs (dispatch/prefect/server_locks.py)."""

    def try_acquire(self, task_id: str, patterns: list[str]) -> LockAnswer: ...

    def release(self, token: str) -> None: ...


@dataclass(frozen=True)
class _Unanswered:
    """A lock request that broke before the table answered: the spec waits and asks again."""

    error: str
    token: None = None
    retry_after: float = 0.0

    def __bool__(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return f"waiting for the server's lock table: {self.error}"


@dataclass(frozen=True)
class _Asked:
    """What a helper thread got for a spec: its slot (None: the node is full) and the lock table's answer
    (None: no locks asked)."""

    slot: Any
    locks: Any


@dataclass(frozen=True)
class Decision:
    """What became of one pick: `start` it with `chain`, `fail` it (`reason`), it `wait`s (`reason`, said once
    per new reason when `loud`), it is `refused` (its node was full: picked again), or it is `cancelled` (the
    run stops)."""

    kind: str
    assignment: Assignment
    chain: tuple[str, ...] = ()
    reason: str = ""
    loud: bool = False


class Admission:
    """The checks between a pick and its start, and what started specs hold.

    Args:
        scheduler: the run's scheduler.
        specs: the project's specs by id.
        cooldowns: the models' cool-downs.
        budgets: the daily budgets.
        brokers: the nodes' slots across dispatchers.
        share: this run's fair share of the slots.
        locks: the server's lock table (team mode with `modifies`), else None.
        user: who the run's specs spend for (budgets).
        post: called with `("locks", (task_id, answer))` from a helper thread; the loop hands it to
            `locks_answered`.
        clock: wall-clock time (cool-down resets and budget days are wall-clock times).
    """

    def __init__(self, scheduler: Scheduler, specs: Mapping[str, Spec], *, cooldowns: Cooldowns, budgets: Budgets,
                 brokers: Brokers, share: FairShare, locks: LockServer | None, user: str,
                 post: Callable[[str, Any], None], clock: Callable[[], float] = time.time) -> None:
        self.scheduler, self.specs = scheduler, specs
        self.cooldowns, self.budgets, self.brokers, self.share, self.locks = cooldowns, budgets, brokers, share, locks
        self.user, self._post, self._clock = user, post, clock
        self._held: dict[str, tuple[Any, str | None]] = {}  # started: task id -> (slot, lock token)
        self._asking: dict[str, tuple[Assignment, Any, tuple[str, ...]]] = {}  # waiting for its locks' answer
        self._models: dict[str, str] = {}  # started agent specs: task id -> the model it started with
        self._burst: dict[str, list[tuple[str, list[str]]]] = {}  # this round's new server slots: node -> picks
        self._requests = (ThreadPoolExecutor(max_workers=_ASKERS, thread_name_prefix="server-locks")
                          if locks is not None or brokers.remote_any() else None)

    # -- one round ---------------------------------------------------------------------------------
    def admit(self, assignments: list[Assignment]) -> tuple[list[Decision], bool]:
        """Decide the scheduler's picks; whether a node was found full by its broker (pick again at once)."""
        decisions: list[Decision] = []
        refused = False
        for assignment in self._within_share(assignments):
            decision = self._admit(assignment)
            if decision is None:
                refused = True
            elif decision.kind != "asking":
                decisions.append(decision)
        for node, picks in self._burst.items():
            self._requests.submit(self._asked_burst, node, picks)  # type: ignore[union-attr]
        self._burst = {}
        self._prefer_parked()
        return decisions, refused

    def _prefer_parked(self) -> None:
        """Point the scheduler's next picks at the nodes where this run has parked slots (a start there costs
        no server call); such a node is not full for this run, whatever a refused take said a moment ago."""
        parked = {node: count for node, count in self.brokers.parked().items() if node in self.scheduler.nodes}
        self.scheduler.prefer = parked
        for node in parked:
            if self.scheduler.set_aside(node):
                self.scheduler.node_full(node, 0.0)

    def _within_share(self, assignments: list[Assignment]) -> list[Assignment]:
        """The picks this run may start within its fair share of the slots; the rest wait a moment.

        A parked slot (an ended spec's, kept for the next on its node: brokers.py) counts as held: a pick that
        takes one passes first, within the share like any other; the parked slots no pick takes count against
        the share like releases, and go back after their grace. When the share refuses even a pick that would
        take a parked slot, the run holds more than its share: its parked slots no admitted pick takes go back
        at once (`trim`), not after their grace: another run is owed them."""
        running = len(self.scheduler.running)  # the new picks included
        held = running - len(assignments)
        parked = self.brokers.parked()
        matched = dict(parked)
        first, fresh = [], []  # picks on a node with a parked slot go first: they cost no server call
        for assignment in assignments:
            if matched.get(assignment.node, 0) > 0:
                matched[assignment.node] -= 1
                first.append(assignment)
            else:
                fresh.append(assignment)
        allowed = self.share.allowed(running + self.scheduler.due(), held,
                                     releasing=self.brokers.releasing() + sum(matched.values()))
        room = max(allowed - held, 0)
        admitted, waiting = (first + fresh)[:room], (first + fresh)[room:]
        if len(first) > room:  # over its share: the parked slots go back now (the others wait for their grace)
            keep: dict[str, int] = {}
            for assignment in admitted:
                if assignment.node in parked:
                    keep[assignment.node] = min(keep.get(assignment.node, 0) + 1, parked[assignment.node])
            self.brokers.trim(sum(parked.values()), keep=keep)
        for assignment in waiting:
            self._give_back(assignment, delay=SHARE_RETRY)
        chosen = {id(assignment) for assignment in admitted}
        return [assignment for assignment in assignments if id(assignment) in chosen]

    def _admit(self, assignment: Assignment) -> Decision | None:
        """One pick through the checks; None when its node was found full (it goes back, pick again)."""
        task_id = assignment.task_id
        spec = self.specs[task_id]
        chain, free_at = self.cooldowns.usable(spec.model_chain) if spec.kind == "agent" else (spec.model_chain,
                                                                                                None)
        if not chain and free_at is None:  # every model blocked for billing: waiting cannot help
            return Decision("fail", assignment, reason=self.cooldowns.blocked_reason(spec.model_chain))
        if not chain:  # every model is out of quota: wait for the first reset
            self._give_back(assignment, delay=min(max(1.0, free_at - self._clock()), _COOLDOWN_LOOK))
            until = time.strftime("%H:%M:%S", time.localtime(free_at))
            return Decision("wait", assignment, reason=f"every model is on cool-down until {until}")
        if self.budgets.enabled and spec.kind == "agent":
            chain, why = self.budgets.check(chain, self.user, list(self._models.values()))
            if why:
                now = self._clock()
                self._give_back(assignment, delay=min(_BUDGET_LOOK, max(1.0, next_utc_midnight(now) - now)))
                return Decision("wait", assignment, reason=why, loud=True)
        if self.scheduler.set_aside(assignment.node):  # placed before its node was found full in this round
            self._give_back(assignment)
            return None
        patterns = list(spec.modifies) if self.locks is not None else []
        slot = self.brokers.take_parked(assignment.node)  # an ended spec's slot on this node: no server call
        if slot is None and self.brokers.remote(assignment.node):  # a new one from the server, off the loop
            self._asking[task_id] = (assignment, None, tuple(chain))
            self._burst.setdefault(assignment.node, []).append((task_id, patterns))
            return Decision("asking", assignment)
        if slot is None:
            slot = self.brokers.try_acquire(assignment.node)
        if slot is None:  # another dispatcher holds this node's slots right now
            self.scheduler.node_full(assignment.node, BUSY_RETRY)
            self._give_back(assignment)
            return None
        if patterns:  # after the slot, asked off the loop (HTTP)
            self._ask(assignment, slot, tuple(chain), patterns)
            return Decision("asking", assignment)
        return self._start(assignment, slot, None, tuple(chain))

    def _start(self, assignment: Assignment, slot: Any, token: str | None, chain: tuple[str, ...]) -> Decision:
        self._hold(assignment.task_id, slot, token, chain)
        return Decision("start", assignment, chain=chain)

    def _hold(self, task_id: str, slot: Any, token: str | None, chain: tuple[str, ...]) -> None:
        self._held[task_id] = (slot, token)
        if self.specs[task_id].kind == "agent" and chain:
            self._models[task_id] = chain[0]

    # -- asked off the loop: a server slot, the server's locks -------------------------------------
    def _ask(self, assignment: Assignment, slot: Any, chain: tuple[str, ...], patterns: list[str]) -> None:
        self._asking[assignment.task_id] = (assignment, slot, chain)
        self._requests.submit(self._asked, assignment.task_id, assignment.node,  # type: ignore[union-attr]
                              slot, patterns)

    def _asked_burst(self, node: str, picks: list[tuple[str, list[str]]]) -> None:
        """In a helper thread: this round's new slots of `node` in one request, then each pick's locks; the
        picks it got no slot for come back refused (their node is full for now)."""
        try:
            slots = self.brokers.try_acquire_many(node, len(picks))
        except Exception:  # the broker answers the server's errors itself: this is a bug, said with its stack
            logger.exception("taking %d slot(s) of %s failed; the picks wait and are picked again", len(picks), node)
            slots = []
        for index, (task_id, patterns) in enumerate(picks):
            slot = slots[index] if index < len(slots) else None
            if slot is None or not patterns:
                self._post("locks", (task_id, _Asked(slot, None)))
                continue
            try:
                self._requests.submit(self._asked, task_id, node, slot, patterns)  # type: ignore[union-attr]
            except RuntimeError:  # the run is closing: ask here, so that the answer still comes back
                self._asked(task_id, node, slot, patterns)

    def _asked(self, task_id: str, node: str, slot: Any, patterns: list[str]) -> None:
        """In a helper thread: take the node's slot from the server (unless held), then ask the lock table;
        the answer always comes back (a lost one would leave the spec holding its slot for ever)."""
        answer: Any = None
        try:
            if slot is None:
                slot = self.brokers.try_acquire(node)
            if slot is not None and patterns:
                answer = self.locks.try_acquire(task_id, patterns)  # type: ignore[union-attr]
        except Exception as exc:  # the table answers its errors itself; anything else: wait and ask again
            answer = _Unanswered(f"{type(exc).__name__}: {exc}"[:300], retry_after=_LOCK_RETRY * (1 + random.random()))
        self._post("locks", (task_id, _Asked(slot, answer)))

    def locks_answered(self, task_id: str, answer: Any, stop_reason: str = "") -> Decision:
        """Start the spec with its slot and locks; refused (or the run stops): everything it took goes back."""
        assignment, slot, chain = self._asking.pop(task_id)
        if isinstance(answer, _Asked):
            slot, answer = answer.slot, answer.locks
        if stop_reason:
            self._give_back(assignment, slot=slot, token=answer.token if answer else None, cancel=stop_reason)
            return Decision("cancelled", assignment, reason=stop_reason)
        if slot is None:  # another dispatcher holds this node's slots right now: pick again (other nodes)
            self.scheduler.node_full(assignment.node, BUSY_RETRY)
            self._give_back(assignment)
            return Decision("refused", assignment)
        if answer is not None and not answer:  # another user's overlapping spec runs
            self._give_back(assignment, slot=slot, delay=answer.retry_after)
            return Decision("wait", assignment, reason=answer.reason)
        return self._start(assignment, slot, answer.token if answer is not None else None, chain)

    def adopt_runs(self, node: str, live: Mapping[str, str], finished: Mapping[str, str], *,
                   keys: Mapping[str, str], fresh: set[str]) -> list[tuple[str, bool, str]]:
        """Adopt what an earlier dispatcher left on `node` instead of running it twice: its runs still `live` and
        those `finished` (succeeded while no dispatcher watched), task id -> cache key, of specs unchanged
        (`keys`), not forced (`fresh`) and not started here yet. Returns (task id, finished, why its file locks
        could not be taken or '') for each; an edited spec's stale runner is killed when it is dispatched again."""
        adopted = []
        for task_id, key in [*live.items(), *finished.items()]:
            if task_id not in self.scheduler.entries or task_id in fresh or key != keys.get(task_id):
                continue
            if self.scheduler.state(task_id) not in (WAITING, READY):
                continue
            self.scheduler.adopt(task_id, node, 1)
            done = task_id in finished  # the transport hands its result back without running it
            adopted.append((task_id, done, self.adopt(task_id, self.specs[task_id].model_chain, locks=not done)))
        return adopted

    def adopt(self, task_id: str, chain: list[str], *, locks: bool = True) -> str:
        """Hold what a spec re-attached from an earlier dispatcher needs (`locks`: it still runs, and its file
        locks died with that dispatcher's lease): '' when held, else why its locks could not be taken (it runs
        on without them)."""
        token, why = None, ""
        patterns = list(self.specs[task_id].modifies)
        if locks and self.locks is not None and patterns:
            answer = self.locks.try_acquire(task_id, patterns)
            token, why = (answer.token, "") if answer else (None, answer.reason)
        self._hold(task_id, None, token, tuple(chain))
        return why

    # -- giving back -------------------------------------------------------------------------------
    def ended(self, task_id: str, *, requeue: Assignment | None = None, delay: float = 0.0) -> None:
        """A started spec's task run ended: give back its slot and locks; `requeue`: nothing ran (its node
        refused it), so the pick itself goes back too and it is picked again after `delay`."""
        self._models.pop(task_id, None)
        slot, token = self._held.pop(task_id, (None, None))
        self._release(slot, token)
        self._prefer_parked()
        if requeue is not None:
            self._give_back(requeue, delay=delay)

    def _give_back(self, assignment: Assignment, *, slot: Any = None, token: str | None = None, delay: float = 0.0,
                   cancel: str = "") -> None:
        """The one way back for a pick that does not start: its locks, its slot, then the pick (or, when the run
        stops, the spec is cancelled)."""
        self._release(slot, token)
        if cancel:
            self.scheduler.cancel_running(assignment.task_id, cancel)
        else:
            self.scheduler.unpick(assignment, delay=delay)

    def _release(self, slot: Any, token: str | None) -> None:
        if token is not None and self.locks is not None:
            self.locks.release(token)
        if slot is not None:
            self.brokers.release(slot)

    def slot(self, task_id: str) -> Any:
        """The slot a started spec holds (None: none, e.g. re-attached)."""
        return self._held.get(task_id, (None, None))[0]

    def close(self) -> None:
        """Wait for lock requests still out (their answers go unread)."""
        if self._requests is not None:
            self._requests.shutdown(wait=True)
