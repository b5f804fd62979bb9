"""What bench/team.py judges in a round of several users' runs: the guarantees across users, each run's
ratios against its bound alone and given its share, and the per-phase tables from the request traces."""

from __future__ import annotations

import json
import os
import re
import resource
from collections import defaultdict
from pathlib import Path

from measures import read_runs, summary
from team_trace import route_table, totals

from rigs.intervals import max_concurrency


def guarantees(users: list[dict], slots: dict[str, int], *, shared_files: bool) -> dict:
    """Slot overruns and lock overlaps over every user's runs at once.

    Args:
        users: per user, `timeline` (its specs' own start/end lines) and `workload` (their `modifies`).
        slots: each node's slots: no instant may see more of every user's specs running there.
        shared_files: the users' projects share one lock table (one repository): a file of one user's spec
            excludes the same file of another's; otherwise only specs of one run exclude each other.
    """
    by_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_file: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for index, user in enumerate(users):
        runs = read_runs(user["timeline"])
        modifies = {s.task_id: s.modifies for s in user["workload"].specs}
        for task_id, spec_runs in runs.items():
            for start, end, node in spec_runs:
                if end is None:
                    continue
                by_node[node].append((start, end))
                for path in modifies.get(task_id, []):
                    key = path if shared_files else f"u{index + 1}:{path}"
                    by_file[key].append((start, end, f"u{index + 1}:{task_id}"))
    overruns = {node: peak for node, intervals in by_node.items()
                if (peak := max_concurrency(intervals)) > slots.get(node, 0)}
    overlaps = []
    for path, intervals in by_file.items():
        intervals.sort()
        for (_, end, first), (start, _, second) in zip(intervals, intervals[1:], strict=False):
            if start < end:
                overlaps.append(f"{path}: {first} and {second} overlap by {end - start:.3f} s")
    return {"slot_overruns": overruns, "lock_overlaps": overlaps}


def spec_phases(state_file: Path, timeline: Path) -> dict:
    """Ready -> dispatched (the flow's own state file) and dispatched -> started (the spec's timeline)."""
    if not state_file.exists():
        return {}
    rows = json.loads(state_file.read_text()).get("specs", {})
    runs = read_runs(timeline)
    to_dispatch, to_start = [], []
    for task_id, row in rows.items():
        if not runs.get(task_id) or not row.get("dispatched_at"):
            continue
        to_start.append(runs[task_id][-1][0] - row["dispatched_at"])
        if row.get("ready_at"):
            to_dispatch.append(row["dispatched_at"] - row["ready_at"])
    return {"ready_to_dispatched_s": summary(to_dispatch), "dispatched_to_started_s": summary(to_start)}


def thread_name(name: str) -> str:
    """A pool thread's name without its number: `server-locks_3` -> `server-locks`."""
    return re.sub(r"[_-]\d+$", "", name) or "?"


def route_tables(server: list[list], clients: dict[str, list[list]], window: tuple[float, float]) -> dict:
    """The server's calls per phase (all users, and the totals of each), the clients' per thread and phase, and
    per user the time its dispatch loop (MainThread) spent waiting for the server."""
    start, end = window
    merged = [[t, ms, thread_name(who), *rest] for records in clients.values() for t, ms, who, *rest in records]
    loop = {user: round(sum(r[1] for r in records if r[2] == "MainThread" and start <= r[0] <= end) / 1000, 2)
            for user, records in clients.items()}
    return {"server": route_table(server, window),
            "server_totals": totals(server, window),
            "server_by_user": {user: totals(server, window, user) for user in clients},
            "client_by_thread": route_table(merged, window, by_who=True),
            "client_totals": totals(merged, window), "dispatch_loop_waiting_s": loop}


def user_result(user: dict, slots: dict[str, int], users: int) -> dict:
    """One user's run: makespan against its bound alone and given its share (the slots / users), latencies."""
    from measures import schedule_measures

    workload, total = user["workload"], sum(slots.values())
    measures = schedule_measures(workload, user["timeline"], slots)
    share = workload.lower_bound(total / users)["lb_s"]
    makespan = measures.get("makespan_s")
    lock_aware = measures.get("ready_to_running_lock_aware_s") or {}
    return {"user": user["name"], "project": user["project"], "seed": user["seed"], "exit_code": user["exit_code"],
            "specs": len(workload.specs), "finished": measures.get("finished"), "runs": measures.get("runs"),
            "makespan_s": makespan, "bound_s": measures.get("lb_s"), "bound_given_share_s": round(share, 2),
            "makespan_over_bound": measures.get("makespan_over_lb"),
            "makespan_over_bound_given_share": round(makespan / share, 3) if makespan else None,
            "lock_aware_ready_to_start_p50_s": lock_aware.get("median"),
            "lock_aware_ready_to_start_p95_s": lock_aware.get("p95"),
            "utilisation_lock_aware": measures.get("utilisation_lock_aware"),
            "first_start": measures.get("first_start"), "last_end": measures.get("last_end"),
            "phases": spec_phases(user["state_file"], user["timeline"]),
            "lock_overlaps_own": measures.get("lock_overlaps"), "slot_overruns_own": measures.get("slot_overruns")}


_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int, waited: bool = False) -> float:
    """User + system CPU seconds of a live process (0 when it is gone or unreadable), with `waited` also its
    children that ended (PostgreSQL's backends of closed connections)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15 if waited else 13]) / _TICK


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cpu_snapshot(server_pid: int, postgres_pid: int | None) -> dict:
    """Cumulative CPU seconds of the server, of PostgreSQL (postmaster and every backend), of this
    process's waited-for children (the dispatchers), and the machine's busy and total jiffies."""
    postgres = [postgres_pid, *_children(postgres_pid)] if postgres_pid else []
    stat = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"server": _process_cpu(server_pid), "postgres": sum(_process_cpu(p, p == postgres_pid) for p in postgres),
            "dispatchers": children.ru_utime + children.ru_stime,
            "machine_busy": (sum(stat) - stat[3] - stat[4]) / _TICK, "machine_total": sum(stat) / _TICK}


def cpu_delta(before: dict, after: dict) -> dict:
    """CPU seconds used between two snapshots, and how busy the machine's cores were."""
    used = {f"{k}_cpu_s": round(after[k] - before[k], 1) for k in ("server", "postgres", "dispatchers")}
    total = after["machine_total"] - before["machine_total"]
    used["machine_busy_fraction"] = round((after["machine_busy"] - before["machine_busy"]) / total, 3) \
        if total else None
    return used
