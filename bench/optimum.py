"""The true optimum of small projects (OR-Tools CP-SAT), and the gap of the policy to it.

    .venv/bin/pip install -e '.[bench]'     # ortools: a benchmark-only dependency
    .venv/bin/python bench/optimum.py [--specs 20,30,40] [--seeds 1,2,3,4,5] [--profiles standard,lock-heavy]
        [--slots 4,140] [--time-limit 60]

For each drawn project (bench/workload.py) and slot count: the policy's makespan (the real `Scheduler` on a
simulated clock with zero latency, bench/policy_sim.py, with exact and with no estimates), bench/bounds.py's
bound, and the optimum: a CP-SAT model with one fixed-size interval per spec, `depends_on` as precedences,
the slots as a cumulative constraint (specs fit any node, so a node's slots only add up), one no-overlap per
file, minimising the makespan, with the policy's schedule as a hint. Durations in hundredths of a second (as
drawn). A model solved to optimality is marked `optimal`; otherwise the best solution and the solver's own
bound are given. Writes bench/out/optimum.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from policy_sim import run_policy  # noqa: E402
from workload import generate_named, write_project  # noqa: E402

from dispatch.core.dag import load_project  # noqa: E402

_SCALE = 100  # hundredths of a second


def solve_optimum(workload, slots: int, *, time_limit: float = 60.0, hint: dict[str, float] | None = None) -> dict:
    """Minimum makespan of the drawn project on `slots` slots with its dependencies and file locks.

    Returns:
        makespan_s (the best found), bound_s (the solver's proof: no schedule is shorter), optimal (both equal).

    Raises:
        SystemExit: ortools is not installed (say how to install it; a missing solver is no result).
    """
    try:
        from ortools.sat.python import cp_model
    except ImportError as exc:
        raise SystemExit("bench/optimum.py needs OR-Tools: .venv/bin/pip install -e '.[bench]'") from exc
    model = cp_model.CpModel()
    horizon = sum(round(s.seconds * _SCALE) for s in workload.specs)
    start, end, interval = {}, {}, {}
    for spec in workload.specs:
        size = round(spec.seconds * _SCALE)
        start[spec.task_id] = model.new_int_var(0, horizon, f"start_{spec.task_id}")
        end[spec.task_id] = model.new_int_var(0, horizon, f"end_{spec.task_id}")
        interval[spec.task_id] = model.new_interval_var(start[spec.task_id], size, end[spec.task_id],
                                                        f"run_{spec.task_id}")
        for dep in spec.depends_on:
            model.add(start[spec.task_id] >= end[dep])
    if slots < len(workload.specs):
        model.add_cumulative(list(interval.values()), [1] * len(interval), slots)
    by_file: dict[str, list[str]] = defaultdict(list)
    for spec in workload.specs:
        for path in dict.fromkeys(spec.modifies):
            by_file[path].append(spec.task_id)
    for ids in by_file.values():
        if len(ids) > 1:
            model.add_no_overlap([interval[t] for t in ids])
    makespan = model.new_int_var(0, horizon, "makespan")
    model.add_max_equality(makespan, list(end.values()))
    model.minimize(makespan)
    for task_id, at in (hint or {}).items():
        model.add_hint(start[task_id], round(at * _SCALE))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 1  # a 2-core machine shared with others
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return {"makespan_s": None, "bound_s": solver.best_objective_bound / _SCALE, "optimal": False,
                "status": solver.status_name(status)}
    return {"makespan_s": solver.objective_value / _SCALE, "bound_s": solver.best_objective_bound / _SCALE,
            "optimal": status == cp_model.OPTIMAL, "status": solver.status_name(status),
            "solve_s": round(solver.wall_time, 2)}


def compare(profile: str, count: int, seed: int, slots: int, time_limit: float, base: Path) -> dict:
    workload = generate_named(profile, count, seed)
    specs_dir = base / f"opt-{profile}-{count}-s{seed}"
    write_project(workload, specs_dir, base / "timeline")
    project = load_project(specs_dir.name, specs_dir)
    durations = {s.task_id: s.seconds for s in workload.specs}
    exact = run_policy(project, durations, [slots], estimates=durations)
    cold = run_policy(project, durations, [slots], estimates={})
    starts = {t: exact["completion"][t] - durations[t] for t in durations}
    best = solve_optimum(workload, slots, time_limit=time_limit, hint=starts)
    optimum = best["makespan_s"]
    return {"profile": profile, "specs": count, "seed": seed, "slots": slots,
            "bound_s": workload.lower_bound(slots)["lb_s"], "optimum_s": optimum, "optimal": best["optimal"],
            "solver_bound_s": best["bound_s"], "policy_exact_s": round(exact["makespan_s"], 2),
            "policy_cold_s": round(cold["makespan_s"], 2),
            "gap_exact": round(exact["makespan_s"] / optimum - 1, 4) if optimum else None,
            "gap_cold": round(cold["makespan_s"] / optimum - 1, 4) if optimum else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="20,30,40")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--profiles", default="standard,lock-heavy")
    parser.add_argument("--slots", default="4,140", help="slot counts to try (one pool each)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="CP-SAT seconds per project")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "optimum.json")
    args = parser.parse_args()
    results = []
    print(f"{'project':<28}{'slots':>6}{'bound':>8}{'optimum':>9}{'policy':>8}{'gap':>8}{'cold':>8}{'gap':>8}")
    with tempfile.TemporaryDirectory(prefix="optimum-") as tmp:
        for profile in args.profiles.split(","):
            for count in [int(c) for c in args.specs.split(",")]:
                for seed in [int(s) for s in args.seeds.split(",")]:
                    for slots in [int(s) for s in args.slots.split(",")]:
                        row = compare(profile, count, seed, slots, args.time_limit, Path(tmp))
                        results.append(row)
                        mark = "" if row["optimal"] else "*"
                        print(f"{f'{profile} {count} specs s{seed}':<28}{slots:>6}{row['bound_s']:>8.2f}"
                              f"{row['optimum_s']:>8.2f}{mark:1}{row['policy_exact_s']:>8.2f}"
                              f"{row['gap_exact']:>8.1%}{row['policy_cold_s']:>8.2f}{row['gap_cold']:>8.1%}",
                              flush=True)
    gaps = [r["gap_exact"] for r in results if r["gap_exact"] is not None]
    cold = [r["gap_cold"] for r in results if r["gap_cold"] is not None]
    print(f"gap to the optimum, exact estimates: max {max(gaps):.1%}, mean {sum(gaps) / len(gaps):.1%}; "
          f"no estimates: max {max(cold):.1%}, mean {sum(cold) / len(cold):.1%}; * = not proven optimal")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
