"""Measures shared by the benchmarks, computed from what the specs recorded themselves (the timeline)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from rigs.intervals import max_concurrency


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else None


def summary(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p95": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 3), "p95": round(percentile(values, 0.95), 3),
            "max": round(max(values), 3), "n": len(values)}


def read_runs(timeline: Path) -> dict[str, list[tuple[float, float | None, str]]]:
    """Runs per spec id: (start, end or None, node)."""
    runs: dict[str, list[list]] = defaultdict(list)
    if not timeline.exists():
        return {}
    for line in timeline.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        task_id, what, stamp = parts[:3]
        node = parts[3] if len(parts) > 3 else ""
        if what == "start":
            runs[task_id].append([float(stamp), None, node])
        elif runs[task_id]:
            runs[task_id][-1][1] = float(stamp)
    return {k: [tuple(r) for r in v] for k, v in runs.items()}


def startable_together(runnable: list[str], running: list[str], files: dict[str, frozenset[str]]) -> int:
    """How many of the runnable specs that are not running could start at once, file locks allowed.

    A spec whose files a running spec holds cannot start; among the others, specs that share a file exclude each
    other. The count is a greedy maximal set, fewest conflicts first (the classic minimum-degree rule, which is
    exact on the disjoint groups a project's files mostly form).
    """
    running_set = set(running)
    held = frozenset().union(*(files[t] for t in running))
    free = [t for t in runnable if t not in running_set and not files[t] & held]
    conflicts = {t: sum(1 for o in free if o != t and files[t] & files[o]) for t in free}
    taken: set[str] = set()
    count = 0
    for t in sorted(free, key=lambda x: conflicts[x]):
        if not files[t] & taken:
            taken |= files[t]
            count += 1
    return count


def schedule_measures(workload, timeline: Path, slots: dict[str, int], *, step: float = 0.05) -> dict:
    """Makespan, LB*, ratio, utilisation, ready->running latency, lock overlaps and slot overruns.

    ready = when the spec's last dependency ended (its last run's end); roots are ready at the first start
    of any spec (the flow's start-up is reported apart). Two more latency views: `no_lock_wait` keeps only
    specs that no file lock held back; `lock_aware` keeps every spec but counts it ready once its
    dependencies are done and the last spec sharing one of its files that ran before it has ended.
    Utilisation = running slot-seconds / the slot-seconds that could have been used, min(total slots, specs
    ready or running), over the makespan. `utilisation_lock_aware` counts as usable only what could run: the
    running specs plus the ready specs that could start together with them, file locks allowed
    (`startable_together`); a spec waiting for a file that a running spec holds is not runnable.
    """
    runs = read_runs(timeline)
    specs = workload.by_id
    done = {t: r for t, r in runs.items() if any(e is not None for _, e, _ in r)}
    finished = [(s, e, n, t) for t, r in runs.items() for s, e, n in r if e is not None]
    if not finished:
        return {"finished": 0, "specs": len(specs)}
    t0 = min(s for s, _, _, _ in finished)
    t1 = max(e for _, e, _, _ in finished)
    end_of = {t: max(e for _, e, _ in r if e is not None) for t, r in done.items()}
    first_start = {t: min(s for s, _, _ in r) for t, r in runs.items()}
    ready_at: dict[str, float] = {}
    latency, latency_ids = [], []
    for task_id, spec in specs.items():
        if spec.depends_on:
            if all(d in end_of for d in spec.depends_on):
                ready_at[task_id] = max(end_of[d] for d in spec.depends_on)
                if task_id in first_start:
                    latency.append(first_start[task_id] - ready_at[task_id])
                    latency_ids.append(task_id)
        else:
            ready_at[task_id] = t0
    # latency of specs that no file lock held back: no spec sharing a file ran between ready and start
    sharing: dict[str, set[str]] = defaultdict(set)
    for task_id, spec in specs.items():
        for other_id, other in specs.items():
            if other_id != task_id and set(spec.modifies) & set(other.modifies):
                sharing[task_id].add(other_id)
    unblocked = []
    for task_id, spec in specs.items():
        if not spec.depends_on or task_id not in first_start or task_id not in ready_at:
            continue
        ready, start = ready_at[task_id], first_start[task_id]
        if not any(s < start and (e is None or e > ready) for other in sharing[task_id]
                   for s, e, _ in runs.get(other, [])):
            unblocked.append(start - ready)
    # lock-aware: a spec is runnable once its dependencies are done *and* its files are free, i.e. the last
    # spec sharing a file that started before it has ended (no overlaps were observed: it ended before)
    lock_aware = []
    for task_id in latency_ids:
        ready, start = ready_at[task_id], first_start[task_id]
        freed = [e for other in sharing[task_id] for s, e, _ in runs.get(other, []) if s < start and e is not None]
        lock_aware.append(start - max([ready, *(e for e in freed if e <= start)]))
    total_slots = sum(slots.values())
    files = {task_id: frozenset(spec.modifies) for task_id, spec in specs.items()}
    used = possible = possible_lock_aware = 0.0
    t = t0
    while t < t1:
        running = [task for s, e, _, task in finished if s <= t < e]
        runnable = [task_id for task_id, r in ready_at.items() if r <= t < end_of.get(task_id, t1 + 1)]
        used += len(running)
        possible += min(total_slots, len(runnable))
        possible_lock_aware += min(total_slots, len(running) + startable_together(runnable, running, files))
        t += step
    overruns = {}
    for node, limit in slots.items():
        intervals = [(s, e) for s, e, n, _ in finished if n == node]
        peak = max_concurrency(intervals) if intervals else 0
        if peak > limit:
            overruns[node] = peak
    by_file: dict[str, list[str]] = defaultdict(list)
    for task_id, spec in specs.items():
        for path in spec.modifies:
            by_file[path].append(task_id)
    lock_overlaps = 0
    for holders in by_file.values():
        intervals = sorted((s, e) for t in holders for s, e, _ in runs.get(t, []) if e is not None)
        for (_, e1), (s2, _) in zip(intervals, intervals[1:], strict=False):
            if s2 < e1:
                lock_overlaps += 1
    lb = workload.lower_bound(total_slots)
    makespan = t1 - t0
    return {
        "specs": len(specs), "finished": len(done), "runs": len(finished),
        "makespan_s": round(makespan, 2), **lb, "makespan_over_lb": round(makespan / lb["lb_s"], 3),
        "utilisation": round(used / possible, 3) if possible else None,
        "utilisation_lock_aware": round(used / possible_lock_aware, 3) if possible_lock_aware else None,
        "ready_to_running_s": summary(latency), "ready_to_running_no_lock_wait_s": summary(unblocked),
        "ready_to_running_lock_aware_s": summary(lock_aware),
        "lock_overlaps": lock_overlaps, "slot_overruns": len(overruns), "overrun_nodes": overruns,
        "first_start": t0, "last_end": t1,
    }


def write_result(out: Path, result: dict) -> None:
    """Write a benchmark's result as JSON (and print it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
