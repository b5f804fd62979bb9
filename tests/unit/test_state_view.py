"""The state view: each row of the state file `dispatch status` reads, derived from the scheduler's states plus the
few facts only the dispatcher knows (task runs, results, waits, notes)."""

from __future__ import annotations

from pathlib import Path

from dispatch.core.dag import Project
from dispatch.core.placement import NodeSlots
from dispatch.core.results import ProjectState, SpecResult, load_state, save_state
from dispatch.core.scheduler import Assignment, Scheduler
from dispatch.core.specs import Spec
from dispatch.core.state_view import StateView


def _spec(task_id: str, *deps: str) -> Spec:
    return Spec(task_id=task_id, path=Path(f"/specs/demo/{task_id}.md"), body="Do it.\n", depends_on=list(deps),
                kind="shell")


def _view(*specs: Spec) -> tuple[StateView, Scheduler]:
    project = Project(name="demo", specs_dir=Path("/specs/demo"), specs={s.task_id: s for s in specs},
                      order=[s.task_id for s in specs])
    scheduler = Scheduler(project, set(project.specs), [NodeSlots("n1", 1)], clock=lambda: 1000.0)
    return StateView(scheduler, ProjectState(project="demo", run_id="run1")), scheduler


def _result(task_id: str, status: str, **fields: object) -> SpecResult:
    return SpecResult(project="demo", task_id=task_id, status=status, **{"run_id": "run1", **fields})  # type: ignore[arg-type]


def _start(view: StateView, scheduler: Scheduler) -> Assignment:
    (assignment,) = scheduler.pick()
    view.started(assignment.task_id, assignment.attempt, model="shell", task_run_id=f"tr-{assignment.attempt}",
                 at=1.0)
    return assignment


def test_rows_follow_the_scheduler_through_a_failed_attempt_a_retry_and_success() -> None:
    view, scheduler = _view(_spec("S01"), _spec("S02", "S01"))
    assert {t: (r.state, r.reason, r.node, r.attempts) for t, r in view.rows().items()} == {
        "S01": ("waiting", "", "", 0), "S02": ("waiting", "", "", 0)}
    _start(view, scheduler)
    view.note("S01", "glm: 429, retrying 2/10")
    row = view.row("S01")
    assert (row.state, row.reason, row.node, row.attempts, row.task_run_id) == (
        "running", "glm: 429, retrying 2/10", "n1", 1, "tr-1")
    scheduler.fail("S01", "exit 1")
    view.ended("S01", _result("S01", "failed", exit_code=1, duration=2.5), cached=False, at=5.0)
    row = view.row("S01")
    assert (row.state, row.reason, row.exit_code, row.duration, row.ended_at) == ("retrying", "exit 1", 1, 2.5, 5.0)
    scheduler.clock = lambda: 2000.0  # the retry delay is over
    _start(view, scheduler)
    assert (view.row("S01").state, view.row("S01").reason, view.row("S01").attempts) == ("running", "exit 1", 2)
    scheduler.succeed("S01")
    view.ended("S01", _result("S01", "succeeded", exit_code=0), cached=False, at=9.0)
    assert (view.row("S01").state, view.row("S01").reason) == ("succeeded", "")
    assert view.counts() == {"succeeded": 1, "waiting": 1}
    assert view.row("S02").ready_at is None  # ready now, but shown so only once dispatched


def test_a_failure_skips_its_dependents_with_the_schedulers_reason() -> None:
    view, scheduler = _view(_spec("S01"), _spec("S02", "S01"), _spec("S03", "S02"))
    _start(view, scheduler)
    for task_id in scheduler.fail("S01", "exit 2", retryable=False):
        view.skipped(task_id, f"skip-{task_id}")
    view.ended("S01", _result("S01", "failed", exit_code=2), cached=False, at=3.0)
    rows = view.rows()
    assert [(rows[t].state, rows[t].reason) for t in ("S01", "S02", "S03")] == [
        ("failed", "exit 2"), ("not_run", "dependency S01 failed"), ("not_run", "dependency S01 failed")]
    assert rows["S02"].task_run_id == "skip-S02"


def test_waits_say_why_and_a_start_clears_them_while_a_retry_keeps_why_it_failed() -> None:
    view, scheduler = _view(_spec("S01"))
    (assignment,) = scheduler.pick()
    scheduler.unpick(assignment, delay=60)
    assert view.waiting("S01", "budget reached: claude $0.04 of $0.05 today (UTC)")
    assert not view.waiting("S01", "budget reached: claude $0.04 of $0.05 today (UTC)")  # no news
    assert (view.row("S01").state, view.row("S01").reason) == (
        "waiting", "budget reached: claude $0.04 of $0.05 today (UTC)")
    scheduler.clock = lambda: 2000.0
    _start(view, scheduler)
    assert (view.row("S01").state, view.row("S01").reason) == ("running", "")
    view.note("S01", "glm: 429")
    scheduler.fail("S01", "timeout")
    view.ended("S01", _result("S01", "timeout"), cached=False, at=4.0)
    view.note("S01", "a late note")  # not running: ignored
    assert (view.row("S01").state, view.row("S01").reason) == ("retrying", "timeout")


def test_a_spec_its_node_refused_is_ready_and_asking_for_locks_is_not_running_yet() -> None:
    view, scheduler = _view(_spec("S01"))
    assignment = _start(view, scheduler)
    scheduler.unpick(assignment, delay=1.0)
    view.refused("S01", "node n1 is full (2/2)")
    assert (view.row("S01").state, view.row("S01").reason, view.row("S01").attempts) == (
        "ready", "node n1 is full (2/2)", 1)
    scheduler.clock = lambda: 2000.0
    scheduler.pick()  # picked again, its task run not yet submitted (its server locks are asked for)
    assert view.row("S01").state == "ready"
    assert view.counts() == {"ready": 1}


def test_a_cached_result_shows_its_own_node_and_times_and_the_snapshot_is_the_state_file(tmp_path: Path) -> None:
    view, scheduler = _view(_spec("S01"), _spec("S02"))
    _start(view, scheduler)
    scheduler.succeed("S01")
    view.ended("S01", _result("S01", "succeeded", node="far", started_at=10.0, ended_at=20.0, run_id="old"),
               cached=True, at=99.0)
    scheduler.cancel_all("stopped by dispatch stop")
    save_state(tmp_path, view.snapshot())
    state = load_state(tmp_path, "demo")
    assert state is not None and state.run_id == "run1"
    s01, s02 = state.specs["S01"], state.specs["S02"]
    assert (s01.state, s01.node, s01.started_at, s01.ended_at, s01.cached) == ("succeeded", "far", 10.0, 20.0, True)
    assert (s02.state, s02.reason) == ("cancelled", "stopped by dispatch stop")


def test_usage_adds_up_over_fresh_attempts_only() -> None:
    from dispatch.core.results import Attempt
    from dispatch.core.usage import Usage

    view, scheduler = _view(_spec("S01"))
    spent = [Attempt(model="claude", verdict="ok", usage=Usage(cost_usd=0.5, input_tokens=10, output_tokens=2))]
    _start(view, scheduler)
    scheduler.fail("S01", "exit 1")
    view.ended("S01", _result("S01", "failed", attempts=spent), cached=False, at=1.0)
    scheduler.clock = lambda: 2000.0
    _start(view, scheduler)
    scheduler.succeed("S01")
    view.ended("S01", _result("S01", "succeeded", attempts=spent), cached=False, at=2.0)
    row = view.row("S01")
    assert (row.cost_usd, row.input_tokens, row.output_tokens) == (1.0, 20, 4)
