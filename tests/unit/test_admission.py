"""The admission step between a pick and its start, with fake cool-downs, budgets, brokers and a fake lock table:
what a refusal gives back, once, and what it never takes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from dispatch.core.admission import Admission, Decision
from dispatch.core.dag import Project
from dispatch.core.placement import NodeSlots
from dispatch.core.scheduler import Scheduler
from dispatch.core.specs import Spec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _project(*specs: Spec) -> Project:
    return Project(name="demo", specs_dir=Path("/specs/demo"), specs={s.task_id: s for s in specs},
                   order=[s.task_id for s in specs])


def _spec(task_id: str, **fields: object) -> Spec:
    return Spec(task_id=task_id, path=Path(f"/specs/demo/{task_id}.md"), body="Do it.\n", **fields)  # type: ignore[arg-type]


class Cooldowns:
    def __init__(self, cooling: dict[str, float | None] | None = None) -> None:
        self.cooling = cooling or {}  # model -> when its quota frees (None: blocked for billing)

    def usable(self, chain: list[str]) -> tuple[list[str], float | None]:
        usable = [m for m in chain if m not in self.cooling]
        frees = [self.cooling[m] for m in chain if self.cooling.get(m) is not None]
        return (usable, None) if usable else ([], min(frees) if frees else None)

    def blocked_reason(self, chain: list[str]) -> str:
        return f"every model is blocked for billing: {', '.join(chain)}"


class Budgets:
    def __init__(self, why: str = "") -> None:
        self.why, self.enabled, self.asked = why, True, []

    def check(self, chain: list[str], user: str, running: list[str]) -> tuple[list[str], str]:
        self.asked.append((list(chain), user, list(running)))
        return ([], self.why) if self.why else (chain, "")


class Brokers:
    def __init__(self, free: int = 10) -> None:
        self.free, self.taken, self.released = free, [], []

    def try_acquire(self, node: str) -> tuple[str, object] | None:
        if self.free <= 0:
            return None
        self.free -= 1
        self.taken.append(("machine", len(self.taken)))
        return self.taken[-1]

    def release(self, held: tuple[str, object]) -> None:
        self.released.append(held)
        self.free += 1

    def releasing(self) -> int:
        return 0

    def parked(self) -> dict[str, int]:
        return {}

    def remote(self, node: str) -> bool:
        return False

    def remote_any(self) -> bool:
        return False

    def take_parked(self, node: str) -> None:
        return None

    def trim(self, count: int, keep: dict[str, int] | None = None) -> int:
        return 0


class Share:
    def __init__(self, room: int = 100) -> None:
        self.room = room

    def allowed(self, demand: int, held: int, releasing: int = 0) -> int:
        return min(demand, self.room)


@dataclass
class Answer:
    token: str | None
    reason: str = ""
    retry_after: float = 0.3

    def __bool__(self) -> bool:
        return self.token is not None


class Locks:
    def __init__(self, *answers: Answer) -> None:
        self.answers, self.released = list(answers), []

    def try_acquire(self, task_id: str, patterns: list[str]) -> Answer:
        return self.answers.pop(0)

    def release(self, token: str) -> None:
        self.released.append(token)


def _admission(project: Project, *, slots: int = 2, cooldowns: Cooldowns | None = None,
               budgets: Budgets | None = None, brokers: Brokers | None = None, share: Share | None = None,
               locks: Locks | None = None):
    clock = FakeClock()
    scheduler = Scheduler(project, set(project.specs), [NodeSlots("n1", slots)], clock=clock)
    posted: list[tuple[str, object]] = []
    done = threading.Event()

    def post(kind: str, data: object) -> None:
        posted.append((kind, data))
        done.set()

    budgets = budgets or Budgets()
    budgets.enabled = budgets.why != ""
    admission = Admission(scheduler, project.specs, cooldowns=cooldowns or Cooldowns(), budgets=budgets,
                          brokers=brokers or Brokers(), share=share or Share(), locks=locks, user="alice",
                          post=post, clock=clock)
    return admission, scheduler, posted, done


def test_a_refused_lock_after_a_granted_slot_gives_the_slot_back_once_and_the_spec_waits() -> None:
    brokers = Brokers()
    locks = Locks(Answer(None, reason="waiting for lock src/** (bob@box S07)", retry_after=0.4))
    admission, scheduler, posted, done = _admission(_project(_spec("S01", modifies=["src/**"])), brokers=brokers,
                                                    locks=locks)
    decisions, refused = admission.admit(scheduler.pick())
    assert (decisions, refused) == ([], False)  # asking for its locks: nothing decided yet
    assert done.wait(5), "the lock table's answer never came back"
    (kind, (task_id, answer)), = posted
    assert brokers.taken and not brokers.released  # the slot is held while the locks are asked for
    decision = admission.locks_answered(task_id, answer)
    assert decision == Decision("wait", decision.assignment, reason="waiting for lock src/** (bob@box S07)")
    assert brokers.released == brokers.taken  # given back, once
    assert locks.released == []  # nothing was granted
    assert scheduler.state("S01") == "ready" and scheduler.attempts("S01") == 0
    assert scheduler.nodes["n1"].used == 0 and scheduler.next_wakeup() == 1000.4
    admission.close()


def test_a_budget_refusal_takes_no_slot() -> None:
    brokers = Brokers()
    budgets = Budgets(why="budget reached: claude $0.04 of $0.05 today (UTC)")
    admission, scheduler, _, _ = _admission(_project(_spec("S01", models=["claude"])), brokers=brokers,
                                            budgets=budgets)
    decisions, refused = admission.admit(scheduler.pick())
    assert [(d.kind, d.reason, d.loud) for d in decisions] == [("wait", budgets.why, True)] and not refused
    assert brokers.taken == [] and brokers.released == []
    assert scheduler.state("S01") == "ready" and scheduler.attempts("S01") == 0
    assert scheduler.nodes["n1"].used == 0 and scheduler.next_wakeup() is not None


def test_a_spec_on_cool_down_takes_no_slot_and_one_blocked_for_billing_fails() -> None:
    brokers = Brokers()
    project = _project(_spec("S01", models=["glm"]), _spec("S02", models=["claude"]))
    admission, scheduler, _, _ = _admission(project, brokers=brokers,
                                            cooldowns=Cooldowns({"glm": 1100.0, "claude": None}))
    decisions, _ = admission.admit(scheduler.pick())
    found = {d.assignment.task_id: (d.kind, d.reason) for d in decisions}
    assert found["S01"][0] == "wait" and found["S01"][1].startswith("every model is on cool-down until ")
    assert found["S02"] == ("fail", "every model is blocked for billing: claude")
    assert brokers.taken == []
    assert scheduler.state("S01") == "ready" and scheduler.next_wakeup() == 1100.0
    assert scheduler.state("S02") == "running"  # the flow fails it (and skips its dependents)


def test_a_granted_lock_starts_the_spec_and_its_end_gives_slot_and_locks_back_once() -> None:
    brokers = Brokers()
    locks = Locks(Answer("lock-1"))
    admission, scheduler, posted, done = _admission(_project(_spec("S01", modifies=["src/**"])), brokers=brokers,
                                                    locks=locks)
    admission.admit(scheduler.pick())
    assert done.wait(5)
    decision = admission.locks_answered(*posted[0][1])
    assert decision.kind == "start" and admission.slot("S01") == brokers.taken[0]
    admission.ended("S01")
    admission.ended("S01")  # a second end gives nothing back twice
    assert brokers.released == brokers.taken and locks.released == ["lock-1"]
    admission.close()


def test_stopping_while_locks_are_asked_gives_the_grant_and_the_slot_back_and_cancels() -> None:
    brokers = Brokers()
    locks = Locks(Answer("lock-1"))
    admission, scheduler, posted, done = _admission(_project(_spec("S01", modifies=["src/**"])), brokers=brokers,
                                                    locks=locks)
    admission.admit(scheduler.pick())
    assert done.wait(5)
    decision = admission.locks_answered(*posted[0][1], stop_reason="stopped by dispatch stop")
    assert decision.kind == "cancelled"
    assert brokers.released == brokers.taken and locks.released == ["lock-1"]
    assert scheduler.state("S01") == "cancelled" and scheduler.nodes["n1"].used == 0
    admission.close()


def test_a_node_refusing_the_attempt_gives_the_slot_back_and_the_pick_with_it() -> None:
    brokers = Brokers()
    admission, scheduler, _, _ = _admission(_project(_spec("S01")), brokers=brokers)
    (decision,), _ = admission.admit(scheduler.pick())
    assert decision.kind == "start"
    admission.ended("S01", requeue=decision.assignment, delay=1.0)
    assert brokers.released == brokers.taken
    assert scheduler.state("S01") == "ready" and scheduler.attempts("S01") == 0 and scheduler.next_wakeup() == 1001.0


def test_a_full_broker_sets_the_node_aside_and_takes_nothing() -> None:
    brokers = Brokers(free=0)
    admission, scheduler, _, _ = _admission(_project(_spec("S01"), _spec("S02")), brokers=brokers)
    decisions, refused = admission.admit(scheduler.pick())
    assert decisions == [] and refused
    assert brokers.released == [] and scheduler.nodes["n1"].used == 0
    assert scheduler.set_aside("n1") and [scheduler.state(t) for t in ("S01", "S02")] == ["ready", "ready"]


def test_picks_beyond_the_fair_share_go_back_without_a_slot() -> None:
    brokers = Brokers()
    admission, scheduler, _, _ = _admission(_project(_spec("S01"), _spec("S02")), brokers=brokers,
                                            share=Share(room=1))
    decisions, _ = admission.admit(scheduler.pick())
    assert [d.kind for d in decisions] == ["start"] and len(brokers.taken) == 1
    assert sorted(scheduler.state(t) for t in ("S01", "S02")) == ["ready", "running"]


def test_the_budget_counts_the_models_of_the_specs_already_started() -> None:
    budgets = Budgets()
    project = _project(_spec("S01", models=["claude"]), _spec("S02", models=["glm"]), _spec("S03", models=["glm"]))
    admission, scheduler, _, _ = _admission(project, budgets=budgets, slots=2)
    admission.budgets.enabled = True
    admission.admit(scheduler.pick())
    assert [running for _, _, running in budgets.asked] == [[], ["claude"]]
    admission.ended("S01")
    scheduler.succeed("S01")
    admission.admit(scheduler.pick())
    assert budgets.asked[-1] == (["glm"], "alice", ["glm"])  # S01's model no longer counts


def test_adopting_an_earlier_dispatchers_runs_takes_unchanged_specs_only_and_locks_only_for_live_ones() -> None:
    locks = Locks(Answer(None, reason="waiting for lock src/** (bob@box S07)"))
    project = _project(_spec("S01", modifies=["src/**"]), _spec("S02", modifies=["src/**"]), _spec("S03"),
                       _spec("S04"))
    admission, scheduler, _, _ = _admission(project, locks=locks, slots=4)
    keys = {"S01": "k1", "S02": "k2", "S03": "k3", "S04": "k4"}
    adopted = admission.adopt_runs("n1", {"S01": "k1", "S03": "edited"}, {"S02": "k2", "S04": "k4"}, keys=keys,
                                   fresh={"S04"})
    assert adopted == [("S01", False, "waiting for lock src/** (bob@box S07)"), ("S02", True, "")]
    assert [scheduler.state(t) for t in ("S01", "S02", "S03", "S04")] == ["running", "running", "ready", "ready"]
    assert locks.answers == []  # asked once: for the live S01, not for the finished S02
    admission.ended("S01")
    assert locks.released == []  # nothing was granted, nothing goes back
    admission.close()
