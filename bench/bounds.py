"""Lower bounds on a project's makespan that no scheduler can beat, cheap to compute.

`bench/workload.py --profile lock-heavy --seed 3 --out DIR` prints them for a drawn project.

- critical path: the longest chain of durations through `depends_on`;
- work / slots: every slot busy from start to end;
- per file lock, Jackson's bound: the specs that modify one file run one at a time, like jobs on one machine.
  Each has a release time (the longest path before it: it cannot start earlier) and a tail (the longest path
  after it: the project cannot end sooner after it). The optimal *preemptive* one-machine schedule with
  releases and tails is Jackson's rule (always run the released job with the longest tail, preempting on each
  release); max(completion + tail) over it bounds every non-preemptive schedule from below. O(n log n) per file.

`bound` = the maximum of all three. The plain bound the earlier benchmarks reported used the busiest file's
work alone instead of Jackson's bound (it ignores that a file's first spec cannot start at time 0 and its last
one has work after it).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable


def heads_and_tails(durations: dict[str, float], depends_on: dict[str, list[str]],
                    order: Iterable[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Longest path before each spec (head: its earliest start) and after it (tail), by `depends_on`.

    Args:
        durations: seconds per id.
        depends_on: each id's dependencies.
        order: the ids in a dependency-respecting order.
    """
    order = list(order)
    head: dict[str, float] = {}
    dependents: dict[str, list[str]] = defaultdict(list)
    for task_id in order:
        deps = depends_on.get(task_id, [])
        head[task_id] = max((head[d] + durations[d] for d in deps), default=0.0)
        for dep in deps:
            dependents[dep].append(task_id)
    tail: dict[str, float] = {}
    for task_id in reversed(order):
        tail[task_id] = max((durations[c] + tail[c] for c in dependents[task_id]), default=0.0)
    return head, tail


def jackson_bound(jobs: Iterable[tuple[float, float, float]]) -> float:
    """Jackson's preemptive one-machine bound: max over jobs of completion + tail.

    Args:
        jobs: (release, duration, tail) per job.

    Examples:
        >>> jackson_bound([(0.0, 2.0, 0.0), (0.0, 3.0, 0.0)])
        5.0
        >>> jackson_bound([(0.0, 1.0, 0.0), (4.0, 1.0, 2.0)])  # the second cannot start before 4
        7.0
    """
    pending = sorted(jobs)
    available: list[tuple[float, int, float]] = []  # (-tail, index, remaining)
    now, best, index = 0.0, 0.0, 0
    while index < len(pending) or available:
        if not available:
            now = max(now, pending[index][0])
        while index < len(pending) and pending[index][0] <= now:
            release, duration, tail = pending[index]
            heapq.heappush(available, (-tail, index, duration))
            index += 1
        negative_tail, number, remaining = heapq.heappop(available)
        next_release = pending[index][0] if index < len(pending) else float("inf")
        run = min(remaining, next_release - now)
        now += run
        if run < remaining:  # preempted by a release: back in the queue with what is left
            heapq.heappush(available, (negative_tail, number, remaining - run))
        else:
            best = max(best, now - negative_tail)
    return best


def project_bounds(durations: dict[str, float], depends_on: dict[str, list[str]], modifies: dict[str, list[str]],
                   order: Iterable[str], slots: int) -> dict[str, float]:
    """Every bound of a project (each file in `modifies` taken literally as one lock), and their maximum.

    Returns:
        critical_path_s, work_over_slots_s, busiest_lock_s (work under the busiest file), jackson_s (the largest
        per-file Jackson bound), plain_s (max of the first three: the earlier benchmarks' LB*) and bound_s
        (max of critical path, work / slots and Jackson's bound).
    """
    order = list(order)
    head, tail = heads_and_tails(durations, depends_on, order)
    by_file: dict[str, list[str]] = defaultdict(list)
    for task_id in order:
        for path in dict.fromkeys(modifies.get(task_id, [])):
            by_file[path].append(task_id)
    critical = max((head[t] + durations[t] + tail[t] for t in order), default=0.0)
    work = sum(durations.values())
    busiest = max((sum(durations[t] for t in ids) for ids in by_file.values()), default=0.0)
    jackson = max((jackson_bound((head[t], durations[t], tail[t]) for t in ids) for ids in by_file.values()),
                  default=0.0)
    parts = {"critical_path_s": critical, "work_over_slots_s": work / slots, "busiest_lock_s": busiest,
             "jackson_s": jackson}
    result = {k: round(v, 3) for k, v in parts.items()}
    result["plain_s"] = round(max(critical, work / slots, busiest), 3)
    result["bound_s"] = round(max(critical, work / slots, jackson), 3)
    return result


def workload_bounds(workload, slots: int) -> dict[str, float]:
    """`project_bounds` of a drawn project (bench/workload.py)."""
    specs = workload.specs
    return project_bounds({s.task_id: s.seconds for s in specs}, {s.task_id: s.depends_on for s in specs},
                          {s.task_id: s.modifies for s in specs}, [s.task_id for s in specs], slots)
