"""The in-flow ready queue on a fake clock: order, slots, file locks, exclusivity, retries, failures, placement."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dispatch.core.dag import Project, load_project
from dispatch.core.locks import conflicts
from dispatch.core.placement import NodeSlots
from dispatch.core.scheduler import Assignment, Scheduler
from dispatch.core.spec_state import CANCELLED, FAILED, NOT_RUN, READY, RUNNING, SUCCEEDED, WAITING
from dispatch.core.specs import Spec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _spec(task_id: str, *deps: str, **fields: object) -> Spec:
    return Spec(task_id=task_id, path=Path(f"/specs/demo/{task_id}.md"), body="Do it.\n",
                depends_on=list(deps), **fields)  # type: ignore[arg-type]


def _project(*specs: Spec) -> Project:
    """A project whose order is the order given (dependencies must come first)."""
    seen: set[str] = set()
    for spec in specs:
        assert set(spec.depends_on) <= seen, f"{spec.task_id} listed before its dependencies"
        seen.add(spec.task_id)
    return Project(name="demo", specs_dir=Path("/specs/demo"), specs={s.task_id: s for s in specs},
                   order=[s.task_id for s in specs])


def _scheduler(project: Project, nodes: list[NodeSlots] | None = None, clock: FakeClock | None = None,
               **options: object) -> Scheduler:
    return Scheduler(project, set(project.specs), nodes or [NodeSlots("n1", 4)], clock=clock or FakeClock(),
                     **options)  # type: ignore[arg-type]


def _ids(assignments: list[Assignment]) -> list[str]:
    return [a.task_id for a in assignments]


def _one_at_a_time(scheduler: Scheduler) -> list[str]:
    """Run a one-slot project to its end, each spec succeeding at once; the ids in the order they started."""
    started = []
    while not scheduler.done:
        [assignment] = scheduler.pick()
        started.append(assignment.task_id)
        scheduler.succeed(assignment.task_id)
    return started


def _write(directory: Path, name: str, front: str) -> None:
    (directory / name).write_text(f"---\n{front}---\nDo it.\n", encoding="utf-8")


# -- order ---------------------------------------------------------------------------------------------------


def test_the_spec_holding_a_contended_file_with_the_most_work_behind_it_starts_first() -> None:
    # A has the longest chain of its own (A, A2: 4 s); B is short, but holds src/f.py with 4 s of work behind it
    # (W1, W2, ready as soon as Z has run); Z feeds them.
    project = _project(_spec("A"), _spec("A2", "A"), _spec("Z"), _spec("B", modifies=["src/f.py"]),
                       _spec("W1", "Z", modifies=["src/f.py"]), _spec("W2", "Z", modifies=["src/f.py"]))
    estimates = {"A": 1.0, "A2": 3.0, "Z": 0.5, "B": 1.0, "W1": 2.0, "W2": 2.0}
    scheduler = _scheduler(project, [NodeSlots("n1", 1)], estimates=estimates)

    assert _ids(scheduler.pick()) == ["B"]
    assert scheduler.rank("B") == 5.0 and scheduler.rank("A") == 4.0


def test_the_longest_remaining_chain_goes_first_then_file_order(tmp_path: Path) -> None:
    _write(tmp_path, "S01-short.md", "")                          # chain 1, first in file order
    _write(tmp_path, "S02-long.md", "")                           # chain 3
    _write(tmp_path, "S03-mid.md", "depends_on: [S02]\n")
    _write(tmp_path, "S04-end.md", "depends_on: [S03]\n")
    _write(tmp_path, "S05-other.md", "")                          # chain 1
    project = load_project("demo", tmp_path)
    scheduler = _scheduler(project, [NodeSlots("n1", 1)])

    assert _one_at_a_time(scheduler) == ["S02-long", "S03-mid", "S01-short", "S05-other", "S04-end"]


def test_estimates_make_the_longest_expected_chain_go_first() -> None:
    project = _project(_spec("A"), _spec("B"), _spec("C", "B"))
    scheduler = _scheduler(project, [NodeSlots("n1", 1)], estimates={"A": 100.0, "B": 1.0, "C": 1.0})

    assert _ids(scheduler.pick()) == ["A"]


def test_specs_without_an_estimate_count_as_the_median_of_the_others() -> None:
    project = _project(_spec("A"), _spec("B"), _spec("C"), _spec("D"))
    scheduler = _scheduler(project, estimates={"A": 10.0, "B": 30.0, "C": 20.0})

    assert scheduler.estimate("D") == 20.0


def test_priority_breaks_a_tie_of_ranks() -> None:
    project = _project(_spec("S1", priority=3), _spec("S2"), _spec("S3", priority=1))
    scheduler = _scheduler(project, [NodeSlots("n1", 1)])

    assert _one_at_a_time(scheduler) == ["S3", "S2", "S1"]


def test_priority_does_not_push_back_a_critical_spec_by_more_than_the_margin() -> None:
    # A is the project's critical path (10 s); the urgent B (5 s) would delay it by 5 s, far over 2 % of 10 s.
    project = _project(_spec("A"), _spec("A2", "A"), _spec("B", priority=1))
    scheduler = _scheduler(project, [NodeSlots("n1", 1)], estimates={"A": 1.0, "A2": 9.0, "B": 5.0})

    assert _ids(scheduler.pick()) == ["A"]


def test_priority_moves_a_spec_ahead_where_the_other_has_slack_for_it() -> None:
    # C is critical (10 s) and goes first; A (5 s) has 5 s of slack, enough for the urgent B (1 s) before it.
    project = _project(_spec("C"), _spec("C2", "C"), _spec("A"), _spec("B", priority=1))
    scheduler = _scheduler(project, [NodeSlots("n1", 2)], estimates={"C": 1.0, "C2": 9.0, "A": 5.0, "B": 1.0})

    assert _ids(scheduler.pick()) == ["C", "B"]


def test_without_estimates_priority_only_breaks_ties_of_rank() -> None:
    # nothing measured: every spec counts 1, slack means nothing, so the longer chain goes first
    project = _project(_spec("A"), _spec("A2", "A"), _spec("B", priority=1))
    scheduler = _scheduler(project, [NodeSlots("n1", 1)])

    assert _ids(scheduler.pick()) == ["A"]


def test_one_estimate_for_every_spec_judges_no_slack() -> None:
    # a first run gives every spec not yet run the project's median: by it, A (rank 6) has 3 s of slack for the
    # urgent B (3 s), but real durations differ and that slack is not known, so rank decides
    project = _project(_spec("C"), _spec("C2", "C"), _spec("C3", "C2"), _spec("A"), _spec("A2", "A"),
                       _spec("B", priority=1))
    median = {task_id: 3.0 for task_id in project.specs}
    scheduler = _scheduler(project, [NodeSlots("n1", 2)], estimates=median)

    assert _ids(scheduler.pick()) == ["C", "A"]
    told_apart = _scheduler(project, [NodeSlots("n1", 2)], estimates={**median, "B": 2.9})
    assert _ids(told_apart.pick()) == ["C", "B"]  # estimates of their own: B fits in A's slack


def test_order_priority_keeps_strict_priority_first() -> None:
    project = _project(_spec("A"), _spec("A2", "A"), _spec("B", priority=1), _spec("C", priority=3))
    scheduler = _scheduler(project, [NodeSlots("n1", 1)], estimates={"A": 1.0, "A2": 9.0, "B": 5.0, "C": 50.0},
                           order="priority")

    assert _ids(scheduler.pick()) == ["B"]


def test_an_unknown_order_is_an_error() -> None:
    with pytest.raises(ValueError, match="order must be one of path, priority"):
        _scheduler(_project(_spec("A")), order="fifo")


def test_a_ready_spec_leaves_a_file_free_for_a_more_critical_spec_about_to_need_it() -> None:
    # S could take src/f.py now, but C (chain 11 s) will want it in 1 s, and S would hold it 5 s.
    project = _project(_spec("R"), _spec("C", "R", modifies=["src/f.py"]), _spec("C2", "C"),
                       _spec("S", modifies=["src/f.py"]))
    clock = FakeClock()
    scheduler = _scheduler(project, [NodeSlots("n1", 2)], clock,
                           estimates={"R": 1.0, "C": 1.0, "C2": 10.0, "S": 5.0})

    assert _ids(scheduler.pick()) == ["R"]
    clock.advance(1.0)
    scheduler.succeed("R")
    assert _ids(scheduler.pick()) == ["C"]
    clock.advance(1.0)
    scheduler.succeed("C")
    assert _ids(scheduler.pick()) == ["C2", "S"]


def test_a_ready_spec_leaves_a_file_free_for_a_critical_spec_more_than_one_dependency_away() -> None:
    # C (chain 11 s) wants src/f.py in 2 s, after R and Q; S would hold the file 5 s. The hold used to look only
    # at specs whose last dependency runs (Q waits on R), so S took the file and the project took 16 s, not 13.
    project = _project(_spec("R"), _spec("Q", "R"), _spec("C", "Q", modifies=["src/f.py"]), _spec("C2", "C"),
                       _spec("S", modifies=["src/f.py"]))
    clock = FakeClock()
    scheduler = _scheduler(project, [NodeSlots("n1", 2)], clock,
                           estimates={"R": 1.0, "Q": 1.0, "C": 1.0, "C2": 10.0, "S": 5.0})

    assert _ids(scheduler.pick()) == ["R"]
    for done, then in (("R", ["Q"]), ("Q", ["C"]), ("C", ["C2", "S"])):
        clock.advance(1.0)
        scheduler.succeed(done)
        assert _ids(scheduler.pick()) == then


def test_a_spec_the_priority_rule_would_put_first_anyway_is_not_held() -> None:
    # S (priority 1) could leave src/f.py to C (chain 11 s, due in 1 s), but L makes the project 20 s long, so
    # C's slack covers S's 5 s and, once C is ready, the priority rule puts S ahead of it: waiting would be lost.
    project = _project(_spec("L"), _spec("R"), _spec("C", "R", modifies=["src/f.py"]), _spec("C2", "C"),
                       _spec("S", modifies=["src/f.py"], priority=1))
    scheduler = _scheduler(project, [NodeSlots("n1", 4)],
                           estimates={"L": 20.0, "R": 1.0, "C": 1.0, "C2": 10.0, "S": 5.0})

    assert sorted(_ids(scheduler.pick())) == ["L", "R", "S"]


def test_a_spec_is_never_held_for_one_that_cannot_come() -> None:
    # C's dependency R fits no node: holding S's file for C would stall the run, so S starts.
    project = _project(_spec("R", node="gone"), _spec("C", "R", modifies=["src/f.py"]), _spec("C2", "C"),
                       _spec("S", modifies=["src/f.py"]))
    scheduler = _scheduler(project, [NodeSlots("n1", 2)], estimates={"R": 1.0, "C": 1.0, "C2": 10.0, "S": 5.0})

    assert _ids(scheduler.pick()) == ["S"]


def test_remaining_is_the_longest_path_left_through_dependencies_and_locks() -> None:
    project = _project(_spec("A"), _spec("A2", "A"), _spec("B", modifies=["f"]), _spec("D", modifies=["f"]))
    clock = FakeClock()
    scheduler = _scheduler(project, [NodeSlots("n1", 4)], clock, estimates={"A": 2.0, "A2": 3.0, "B": 4.0, "D": 4.0})

    assert scheduler.remaining() == 8.0  # B then D on one file
    assert sorted(_ids(scheduler.pick())) == ["A", "B"]
    clock.advance(3.0)
    assert scheduler.remaining() == 5.0  # B has 1 s left, then D; A is overdue, A2 still 3 s
    scheduler.succeed("A")
    scheduler.succeed("B")
    assert scheduler.remaining() == 4.0


# -- slots ---------------------------------------------------------------------------------------------------


def test_never_more_running_than_slots_and_never_overlapping_locks_over_a_whole_run() -> None:
    rng = random.Random(7)
    files = ["src/a.py", "src/b.py", "src/", "docs/*.md", "docs/guide.md", "tests/test_x.py", "infra/", "**/*.toml"]
    specs = []
    for index in range(40):
        deps = sorted({f"T{d:02d}" for d in rng.sample(range(index), k=min(index, rng.randint(0, 2)))})
        modifies = rng.sample(files, k=rng.randint(0, 2))
        specs.append(_spec(f"T{index:02d}", *deps, modifies=modifies, priority=rng.choice([1, 2, 2, 3]),
                           exclusive=index in (17, 31)))
    project = _project(*specs)
    nodes = [NodeSlots("n1", 1), NodeSlots("n2", 2), NodeSlots("n3", 3)]
    capacity = {n.name: n.slots for n in nodes}
    clock = FakeClock()
    scheduler = _scheduler(project, nodes, clock, retries=1, retry_delay=1.0)
    running: dict[str, str] = {}
    most_parallel = 0

    for _ in range(2000):
        if scheduler.done:
            break
        for assignment in scheduler.pick():
            spec = project.specs[assignment.task_id]
            assert all(scheduler.state(d) == SUCCEEDED for d in spec.depends_on), assignment
            running[assignment.task_id] = assignment.node
        per_node = {name: list(running.values()).count(name) for name in capacity}
        assert all(per_node[name] <= capacity[name] for name in capacity), per_node
        assert sorted(scheduler.running) == sorted(running)
        for a in running:
            for b in running:
                if a < b:
                    assert not conflicts(project.specs[a].modifies, project.specs[b].modifies), (a, b)
            if project.specs[a].exclusive:
                assert list(running) == [a]
        most_parallel = max(most_parallel, len(running))
        for task_id in [t for t in list(running) if rng.random() < 0.5]:
            del running[task_id]
            if rng.random() < 0.15:
                scheduler.fail(task_id, "agent crashed")
            else:
                scheduler.succeed(task_id)
        clock.advance(0.5)

    assert scheduler.done
    assert most_parallel >= 3  # it really ran specs in parallel
    assert sum(n.used for n in nodes) == 0
    assert scheduler.locks.held == {}


def test_each_node_is_filled_to_its_slots_and_no_further() -> None:
    project = _project(*[_spec(f"S{i:02d}") for i in range(10)])
    nodes = [NodeSlots("n1", 2), NodeSlots("n2", 3)]
    scheduler = _scheduler(project, nodes)

    assignments = scheduler.pick()

    assert len(assignments) == 5
    assert sorted(a.node for a in assignments) == ["n1", "n1", "n2", "n2", "n2"]
    assert scheduler.pick() == []
    scheduler.succeed(assignments[0].task_id)
    assert [a.node for a in scheduler.pick()] == [assignments[0].node]


# -- file locks ----------------------------------------------------------------------------------------------


def test_overlapping_modifies_never_run_together_and_disjoint_ones_do() -> None:
    project = _project(
        _spec("A", modifies=["src/api.py"]),
        _spec("B", modifies=["src/"]),
        _spec("C", modifies=["docs/guide.md"]),
        _spec("D", modifies=["src/*.py"]),
        _spec("E", modifies=["tests/test_api.py"]),
    )
    scheduler = _scheduler(project, [NodeSlots("n1", 8)])

    assert _ids(scheduler.pick()) == ["A", "C", "E"]
    scheduler.succeed("A")
    assert _ids(scheduler.pick()) == ["B"]
    scheduler.succeed("B")
    assert _ids(scheduler.pick()) == ["D"]


def test_a_lock_blocked_spec_does_not_hold_up_later_ones() -> None:
    project = _project(_spec("A", modifies=["x"], priority=1), _spec("B", modifies=["x"]), _spec("C", modifies=["y"]))
    scheduler = _scheduler(project, [NodeSlots("n1", 3)])

    assert _ids(scheduler.pick()) == ["A", "C"]
    assert scheduler.state("B") == READY


# -- exclusive -----------------------------------------------------------------------------------------------


def test_exclusive_spec_first_in_line_runs_alone() -> None:
    project = _project(_spec("E", exclusive=True, priority=1), _spec("A"), _spec("B"))
    scheduler = _scheduler(project, [NodeSlots("n1", 4)])

    assert _ids(scheduler.pick()) == ["E"]
    assert scheduler.pick() == []
    scheduler.succeed("E")
    assert _ids(scheduler.pick()) == ["A", "B"]


def test_exclusive_spec_drains_the_queue_until_it_has_run() -> None:
    project = _project(_spec("A", priority=1), _spec("E", exclusive=True), _spec("B", priority=3))
    scheduler = _scheduler(project, [NodeSlots("n1", 4)])

    assert _ids(scheduler.pick()) == ["A"]  # E is next in line: B must not start before it
    assert scheduler.pick() == []
    scheduler.succeed("A")
    assert _ids(scheduler.pick()) == ["E"]
    assert scheduler.pick() == []
    scheduler.succeed("E")
    assert _ids(scheduler.pick()) == ["B"]


def test_exclusive_spec_that_fails_frees_the_queue() -> None:
    project = _project(_spec("E", exclusive=True, priority=1), _spec("A"))
    scheduler = _scheduler(project, [NodeSlots("n1", 4)])
    scheduler.pick()

    scheduler.fail("E", "bad", retryable=False)

    assert _ids(scheduler.pick()) == ["A"]


# -- retries -------------------------------------------------------------------------------------------------


def test_retries_back_off_exponentially_on_the_clock() -> None:
    clock = FakeClock()
    scheduler = _scheduler(_project(_spec("A")), clock=clock, retries=3, retry_delay=10.0)
    start = clock.now

    for attempt, delay in [(1, 10.0), (2, 20.0), (3, 40.0)]:
        [assignment] = scheduler.pick()
        assert (assignment.task_id, assignment.attempt) == ("A", attempt)
        failed_at = clock.now
        assert scheduler.fail("A", "agent crashed") == []
        assert scheduler.state("A") == READY
        assert scheduler.next_wakeup() == failed_at + delay
        clock.advance(delay - 0.01)
        assert scheduler.pick() == []
        clock.advance(0.01)

    [assignment] = scheduler.pick()
    assert assignment.attempt == 4
    scheduler.fail("A", "agent crashed")
    assert scheduler.state("A") == FAILED
    assert scheduler.attempts("A") == 4
    assert scheduler.reason("A") == "agent crashed"
    assert clock.now - start == pytest.approx(70.0)


def test_a_waiting_retry_does_not_block_other_specs() -> None:
    clock = FakeClock()
    project = _project(_spec("A", priority=1), _spec("B"))
    scheduler = _scheduler(project, [NodeSlots("n1", 1)], clock, retry_delay=5.0)
    scheduler.pick()
    scheduler.fail("A", "crash")

    assert _ids(scheduler.pick()) == ["B"]


@pytest.mark.parametrize(("spec_retries", "default", "attempts"), [(0, 5, 1), (3, 0, 4), (None, 2, 3)])
def test_the_specs_retries_field_wins_over_the_default(spec_retries: int | None, default: int, attempts: int) -> None:
    clock = FakeClock()
    scheduler = _scheduler(_project(_spec("A", retries=spec_retries)), clock=clock, retries=default, retry_delay=1.0)

    runs = 0
    while scheduler.state("A") != FAILED:
        assert scheduler.pick(), "a retry never became due"
        runs += 1
        scheduler.fail("A", "crash")
        clock.advance(1000)

    assert runs == attempts


def test_max_attempts_caps_retries_for_failed_acceptance() -> None:
    clock = FakeClock()
    scheduler = _scheduler(_project(_spec("A")), clock=clock, retries=5, retry_delay=1.0)

    scheduler.pick()
    assert scheduler.fail("A", "acceptance failed", max_attempts=2) == []
    clock.advance(10)
    assert scheduler.pick()[0].attempt == 2
    scheduler.fail("A", "acceptance failed", max_attempts=2)

    assert scheduler.state("A") == FAILED


def test_a_deterministic_failure_is_not_retried() -> None:
    scheduler = _scheduler(_project(_spec("A")), retries=5)
    scheduler.pick()

    scheduler.fail("A", "bad spec", retryable=False)

    assert scheduler.state("A") == FAILED
    assert scheduler.attempts("A") == 1


# -- failure propagation -------------------------------------------------------------------------------------


def test_failure_marks_every_transitive_dependent_not_run_and_independent_specs_still_run() -> None:
    project = _project(
        _spec("A"), _spec("B", "A"), _spec("C", "B"), _spec("D"), _spec("E", "D"), _spec("F", "A", "D"),
    )
    scheduler = _scheduler(project, [NodeSlots("n1", 1)], retries=0)

    assert _ids(scheduler.pick()) == ["A"]
    skipped = scheduler.fail("A", "agent crashed")

    assert sorted(skipped) == ["B", "C", "F"]
    for task_id in ("B", "C", "F"):
        assert scheduler.state(task_id) == NOT_RUN
        assert "A" in scheduler.reason(task_id) and "failed" in scheduler.reason(task_id)
    assert _ids(scheduler.pick()) == ["D"]
    scheduler.succeed("D")
    assert _ids(scheduler.pick()) == ["E"]
    scheduler.succeed("E")
    assert scheduler.done
    assert scheduler.counts() == {FAILED: 1, NOT_RUN: 3, SUCCEEDED: 2}


def test_dependents_wait_until_their_dependency_succeeds() -> None:
    scheduler = _scheduler(_project(_spec("A"), _spec("B", "A")))

    assert _ids(scheduler.pick()) == ["A"]
    assert scheduler.state("B") == WAITING
    assert scheduler.pick() == []
    scheduler.succeed("A")
    assert _ids(scheduler.pick()) == ["B"]


def test_a_retrying_spec_leaves_its_dependents_waiting() -> None:
    scheduler = _scheduler(_project(_spec("A"), _spec("B", "A")), retries=1)
    scheduler.pick()

    assert scheduler.fail("A", "crash") == []

    assert scheduler.state("B") == WAITING


def test_a_cache_hit_before_dispatch_unblocks_dependents() -> None:
    scheduler = _scheduler(_project(_spec("A"), _spec("B", "A")))

    scheduler.succeed("A")

    assert _ids(scheduler.pick()) == ["B"]


def test_specs_outside_the_selection_are_ignored_and_count_as_done() -> None:
    project = _project(_spec("A"), _spec("B", "A"), _spec("C"))
    scheduler = Scheduler(project, {"B", "C"}, [NodeSlots("n1", 4)], clock=FakeClock())

    assert sorted(_ids(scheduler.pick())) == ["B", "C"]
    assert set(scheduler.entries) == {"B", "C"}


# -- placement -----------------------------------------------------------------------------------------------


def test_placement_prefers_most_free_slots_then_lower_node_priority() -> None:
    project = _project(*[_spec(f"S{i}") for i in range(5)])
    nodes = [NodeSlots("small", 2, priority=0), NodeSlots("big-b", 4, priority=2), NodeSlots("big-a", 4, priority=1)]
    scheduler = _scheduler(project, nodes)

    # 4/4 free: priority 1 beats 2; then the most free; at 2/2/2 free the lowest priority (small, 0) wins
    assert [a.node for a in scheduler.pick()] == ["big-a", "big-b", "big-a", "big-b", "small"]


def test_node_field_pins_a_spec_to_that_node() -> None:
    project = _project(_spec("A", node="small"))
    scheduler = _scheduler(project, [NodeSlots("small", 1), NodeSlots("big", 40)])

    assert [(a.task_id, a.node) for a in scheduler.pick()] == [("A", "small")]


def test_a_pinned_spec_waits_for_its_node_while_others_use_the_rest() -> None:
    project = _project(_spec("A"), _spec("B", node="small"), _spec("C"))
    nodes = [NodeSlots("small", 1, priority=0), NodeSlots("big", 1, priority=1)]
    scheduler = _scheduler(project, nodes)

    first = scheduler.pick()
    assert [(a.task_id, a.node) for a in first] == [("A", "small"), ("C", "big")]
    scheduler.succeed("A")
    assert [(a.task_id, a.node) for a in scheduler.pick()] == [("B", "small")]


def test_labels_must_all_be_on_the_node() -> None:
    project = _project(_spec("A", labels=["gpu", "fast"]), _spec("B", labels=["gpu"]))
    nodes = [
        NodeSlots("plain", 8),
        NodeSlots("gpu-only", 1, labels=frozenset({"gpu"})),
        NodeSlots("gpu-fast", 1, labels=frozenset({"gpu", "fast", "ssd"})),
    ]
    scheduler = _scheduler(project, nodes)

    assert {a.task_id: a.node for a in scheduler.pick()} == {"A": "gpu-fast", "B": "gpu-only"}


def test_a_node_without_the_specs_models_does_not_fit_agent_specs() -> None:
    project = _project(_spec("A", models=["glm", "claude"]), _spec("B", executor="glm"), _spec("C", kind="shell"))
    nodes = [NodeSlots("claude-box", 4, models=frozenset({"claude"})), NodeSlots("codex-box", 8,
                                                                                   models=frozenset({"codex"}))]
    scheduler = _scheduler(project, nodes)

    placed = {a.task_id: a.node for a in scheduler.pick()}

    assert placed == {"A": "claude-box", "C": "codex-box"}
    assert scheduler.unplaceable() == ["B"]


def test_a_node_fault_retry_goes_to_another_node() -> None:
    clock = FakeClock()
    nodes = [NodeSlots("n1", 2, priority=1), NodeSlots("n2", 2, priority=2)]
    scheduler = _scheduler(_project(_spec("A")), nodes, clock, retry_delay=1.0)
    assert scheduler.pick()[0].node == "n1"

    scheduler.fail("A", "node unreachable", node_fault=True)
    clock.advance(5)

    assert scheduler.pick()[0].node == "n2"


def test_a_node_fault_retry_waits_for_a_healthy_node_rather_than_reuse_the_faulty_one() -> None:
    clock = FakeClock()
    project = _project(_spec("A", priority=1), _spec("B"))
    nodes = [NodeSlots("n1", 1, priority=1), NodeSlots("n2", 1, priority=2)]
    scheduler = _scheduler(project, nodes, clock, retry_delay=1.0)
    assert {a.task_id: a.node for a in scheduler.pick()} == {"A": "n1", "B": "n2"}

    scheduler.fail("A", "node unreachable", node_fault=True)
    clock.advance(5)

    assert scheduler.pick() == []  # n2, which also fits A, is only busy: wait for it
    scheduler.succeed("B")
    assert [(a.task_id, a.node) for a in scheduler.pick()] == [("A", "n2")]


def test_a_retry_without_node_fault_may_use_the_same_node() -> None:
    clock = FakeClock()
    nodes = [NodeSlots("n1", 2, priority=1), NodeSlots("n2", 2, priority=2)]
    scheduler = _scheduler(_project(_spec("A")), nodes, clock, retry_delay=1.0)
    scheduler.pick()

    scheduler.fail("A", "agent crashed")
    clock.advance(5)

    assert scheduler.pick()[0].node == "n1"


def test_a_node_fault_retry_falls_back_to_the_only_node_that_fits() -> None:
    clock = FakeClock()
    project = _project(_spec("A", node="n1"))
    scheduler = _scheduler(project, [NodeSlots("n1", 1), NodeSlots("n2", 4)], clock, retry_delay=1.0)
    scheduler.pick()

    scheduler.fail("A", "node unreachable", node_fault=True)
    clock.advance(5)

    assert scheduler.pick()[0].node == "n1"


def test_unplaceable_reports_each_spec_no_node_can_run_once_when_it_becomes_ready() -> None:
    project = _project(_spec("A", node="ghost"), _spec("B", labels=["gpu"]), _spec("C"), _spec("D", "C", node="ghost"))
    scheduler = _scheduler(project, [NodeSlots("n1", 4)])

    assert scheduler.unplaceable() == ["A", "B"]
    assert _ids(scheduler.pick()) == ["C"]
    assert scheduler.state("A") == READY and scheduler.state("B") == READY
    assert scheduler.unplaceable() == [], "already reported: the caller fails them"
    scheduler.succeed("C")
    assert scheduler.unplaceable() == ["D"]


def test_no_nodes_is_an_error() -> None:
    with pytest.raises(ValueError):
        Scheduler(_project(_spec("A")), {"A"}, [], clock=FakeClock())


# -- unpick, cancel ------------------------------------------------------------------------------------------


def test_unpick_gives_back_the_slot_and_the_locks() -> None:
    clock = FakeClock()
    project = _project(_spec("A", modifies=["src/a.py"], priority=1), _spec("B", modifies=["src/"]))
    nodes = [NodeSlots("n1", 1)]
    scheduler = _scheduler(project, nodes, clock)
    [assignment] = scheduler.pick()

    scheduler.unpick(assignment, delay=5.0)

    assert nodes[0].used == 0
    assert scheduler.locks.held == {}
    assert scheduler.state("A") == READY and scheduler.attempts("A") == 0
    assert _ids(scheduler.pick()) == ["B"]  # B needs A's slot and overlaps A's lock
    scheduler.succeed("B")
    assert scheduler.pick() == []  # A's delay has not run out
    clock.advance(5.0)
    [again] = scheduler.pick()
    assert (again.task_id, again.attempt) == ("A", 1)


def test_unpick_of_an_exclusive_spec_frees_the_queue() -> None:
    project = _project(_spec("E", exclusive=True, priority=1), _spec("A"))
    clock = FakeClock()
    scheduler = _scheduler(project, clock=clock)
    [assignment] = scheduler.pick()

    scheduler.unpick(assignment, delay=5.0)

    assert _ids(scheduler.pick()) == ["A"]


def test_cancel_all_cancels_what_has_not_started_and_leaves_running_specs() -> None:
    project = _project(_spec("A", priority=1), _spec("B", modifies=["x"]), _spec("C", modifies=["x"]), _spec("D", "A"))
    scheduler = _scheduler(project, [NodeSlots("n1", 2)])
    assert _ids(scheduler.pick()) == ["A", "B"]

    cancelled = scheduler.cancel_all("stopped by the user")

    assert sorted(cancelled) == ["C", "D"]
    assert scheduler.state("C") == CANCELLED and scheduler.reason("C") == "stopped by the user"
    assert scheduler.state("A") == RUNNING and scheduler.state("B") == RUNNING
    assert scheduler.pick() == []
    assert not scheduler.done
    scheduler.cancel_running("A", "stopped by the user")
    scheduler.succeed("B")
    assert scheduler.done
    assert scheduler.nodes["n1"].used == 0
    assert scheduler.locks.held == {}


def test_adopt_counts_a_reattached_spec_as_running() -> None:
    project = _project(_spec("A", modifies=["x"]), _spec("B", modifies=["x"]))
    nodes = [NodeSlots("local", 2)]
    scheduler = _scheduler(project, nodes)

    scheduler.adopt("A", "local", 1)

    assert scheduler.state("A") == RUNNING and nodes[0].used == 1
    assert scheduler.pick() == []  # B overlaps A's lock


# -- drained nodes -------------------------------------------------------------------------------------------


def test_a_drained_node_gets_no_new_spec_its_running_ones_finish_and_undrain_uses_it_again() -> None:
    project = _project(*[_spec(f"S{i:02d}") for i in range(8)])
    scheduler = _scheduler(project, [NodeSlots("n1", 2), NodeSlots("n2", 2)])
    first = scheduler.pick()
    assert sorted(a.node for a in first) == ["n1", "n1", "n2", "n2"]

    assert scheduler.set_drained({"n2"}) is True
    assert scheduler.set_drained({"n2"}) is False  # no change
    for assignment in first:  # the running specs on n2 finish normally and free their slots
        scheduler.succeed(assignment.task_id)
    assert [a.node for a in scheduler.pick()] == ["n1", "n1"]
    assert scheduler.drained_waiting() == {}  # n1 can still run them

    scheduler.set_drained(set())
    assert [a.node for a in scheduler.pick()] == ["n2", "n2"]


def test_ready_specs_whose_every_fitting_node_is_drained_are_named_not_failed() -> None:
    project = _project(_spec("S01", node="n2"), _spec("S02"))
    scheduler = _scheduler(project, [NodeSlots("n1", 1), NodeSlots("n2", 1)])
    scheduler.set_drained({"n1", "n2"})

    assert scheduler.pick() == []
    assert scheduler.unplaceable() == []  # a drained node still fits: the spec waits, it does not fail
    assert scheduler.drained_waiting() == {"S01": ["n2"], "S02": ["n1", "n2"]}
    scheduler.set_drained({"n1"})
    assert [(a.task_id, a.node) for a in scheduler.pick()] == [("S01", "n2")]
    assert scheduler.drained_waiting() == {}  # S02 waits for n2's slot, not for a drained node


def test_a_node_another_dispatcher_filled_is_set_aside_and_its_specs_go_elsewhere() -> None:
    clock = FakeClock()
    project = _project(_spec("S01"), _spec("S02"))
    scheduler = _scheduler(project, [NodeSlots("big", 4), NodeSlots("small", 1)], clock=clock)

    [first, second] = scheduler.pick()
    assert (first.node, second.node) == ("big", "big")  # by this run's own count, the node with most room
    scheduler.node_full("big", 0.2)  # its broker said another dispatcher holds every slot
    scheduler.unpick(first)
    scheduler.unpick(second)
    assert [(a.task_id, a.node) for a in scheduler.pick()] == [("S01", "small")]
    assert scheduler.next_wakeup() == pytest.approx(clock.now + 0.2)  # S02 waits for big to be asked again
    clock.advance(0.2)
    assert [(a.task_id, a.node) for a in scheduler.pick()] == [("S02", "big")]
    assert scheduler.next_wakeup() is None
