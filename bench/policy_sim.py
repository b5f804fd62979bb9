"""The scheduling policy alone: makespan / bound of the real `Scheduler` in a simulated run, per seed.

    .venv/bin/python bench/policy_sim.py [--specs 300] [--seeds 1,2,3,4,5,6] [--profiles standard,lock-heavy]
        [--latency 0,0.05] [--estimates exact,cold,noisy] [--order path,priority] [--slots 8,8,8,8,20,40,48]
        [--code DIR]

Draws the same projects as bench/schedule.py (bench/workload.py, per profile), loads them with the real parser,
and runs `Scheduler.pick()` / `succeed()` on a simulated clock: a spec picked at t ends at t + latency + its
duration + latency (latency: the dispatcher's cost on each side of a spec). Latency 0 is the policy's own
limit. Estimates, what the scheduler is told of durations: `exact` (a history that matches), `noisy` (each
estimate off by a factor drawn from 0.6-1.6, as agent runs vary), `cold` (none: a first run), `median` (the
project's median for every spec: what a first run tells the scheduler once some of its specs have ended). The bound is
bench/bounds.py's (critical path, work / slots, Jackson's per-file bound). `--code DIR` imports `dispatch`
from another checkout (e.g. the commit before a change, `git archive <rev> | tar -x -C DIR`): its scheduler
gets no estimates or order if it takes none. Prints a table and writes bench/out/policy_sim.json.
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _code_root(argv: list[str]) -> Path:
    if "--code" in argv:
        return Path(argv[argv.index("--code") + 1]).resolve()
    return ROOT


sys.path.insert(0, str(_code_root(sys.argv)))
sys.path.insert(1, str(ROOT / "bench"))

# dispatch before bench/cluster.py, which imports dispatch from this checkout: --code's would be ignored
from dispatch.core.dag import load_project  # noqa: E402, I001
from dispatch.core.scheduler import NodeSlots, Scheduler  # noqa: E402

from cluster import DEFAULT_SLOTS, parse_slots  # noqa: E402
from workload import PROFILES, generate_named, write_project  # noqa: E402

ESTIMATES = ("exact", "noisy", "cold", "median")


def estimates_for(durations: dict[str, float], kind: str, seed: int) -> dict[str, float]:
    """What the scheduler is told: the true durations, the same off by 0.6-1.6x, or nothing."""
    if kind == "exact":
        return dict(durations)
    if kind == "noisy":
        rng = random.Random(seed * 7919)
        return {t: d * rng.uniform(0.6, 1.6) for t, d in durations.items()}
    if kind == "median":  # a first run once some specs ended: the project's median for every spec
        middle = statistics.median(durations.values())
        return {t: middle for t in durations}
    return {}


def run_policy(project, durations: dict[str, float], slots: list[int], *, latency: float = 0.0,
               estimates: dict[str, float] | None = None, order: str | None = None) -> dict:
    """Run the project through the real scheduler on a simulated clock; makespan and completion times."""
    now = [0.0]
    options = {}
    parameters = inspect.signature(Scheduler).parameters
    if "estimates" in parameters:
        options["estimates"] = estimates or {}
    if order is not None and "order" in parameters:
        options["order"] = order
    scheduler = Scheduler(project, set(project.specs),
                          [NodeSlots(f"n{i}", count, frozenset(), 0, None) for i, count in enumerate(slots)],
                          clock=lambda: now[0], **options)
    ends: list[tuple[float, str]] = []
    completion: dict[str, float] = {}
    while not scheduler.done:
        for assignment in scheduler.pick():
            heapq.heappush(ends, (now[0] + 2 * latency + durations[assignment.task_id], assignment.task_id))
        if not ends:
            raise RuntimeError("nothing running and nothing picked")
        now[0], task_id = heapq.heappop(ends)
        completion[task_id] = now[0]
        scheduler.succeed(task_id)
    return {"makespan_s": now[0], "completion": completion}


def simulate(profile: str, specs: int, seed: int, slots: list[int], latency: float, estimates: str,
             order: str | None, base: Path) -> dict:
    workload = generate_named(profile, specs, seed)
    specs_dir = base / f"sim-{profile}-s{seed}"
    if not specs_dir.exists():
        write_project(workload, specs_dir, base / "timeline")
    project = load_project(specs_dir.name, specs_dir)
    duration = {spec.task_id: spec.seconds for spec in workload.specs}
    run = run_policy(project, duration, slots, latency=latency, estimates=estimates_for(duration, estimates, seed),
                     order=order)
    bound = workload.lower_bound(sum(slots))
    by_priority = {p: [run["completion"][s.task_id] for s in workload.specs if s.priority == p] for p in (1, 2, 3)}
    return {"profile": profile, "seed": seed, "latency_s": latency, "estimates": estimates, "order": order,
            "makespan_s": round(run["makespan_s"], 2), "lb_s": bound["lb_s"], "plain_lb_s": bound["plain_lb_s"],
            "makespan_over_lb": round(run["makespan_s"] / bound["lb_s"], 3),
            "mean_completion_by_priority_s": {p: round(statistics.fmean(v), 2) for p, v in by_priority.items() if v}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=300)
    parser.add_argument("--seeds", default="1,2,3,4,5,6")
    parser.add_argument("--profiles", default="standard,lock-heavy")
    parser.add_argument("--latency", default="0", help="seconds added on each side of every spec")
    parser.add_argument("--estimates", default="exact,noisy,cold")
    parser.add_argument("--order", default="path", help="path, priority (ignored by a scheduler without orders)")
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--code", type=Path, default=None, help="import dispatch from this checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "policy_sim.json")
    args = parser.parse_args()
    print(f"scheduler: {inspect.getsourcefile(Scheduler)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = set(profiles) - set(PROFILES) | set(args.estimates.split(",")) - set(ESTIMATES)
    if unknown:
        parser.error(f"unknown profile or estimates: {', '.join(sorted(unknown))}")
    latencies = [float(x) for x in args.latency.split(",")]
    slots = parse_slots(args.slots)
    results = []
    with tempfile.TemporaryDirectory(prefix="policy-sim-") as tmp:
        for profile in profiles:
            for seed in seeds:
                for latency in latencies:
                    for kind in args.estimates.split(","):
                        for order in args.order.split(","):
                            results.append(simulate(profile, args.specs, seed, slots, latency, kind, order,
                                                    Path(tmp)))
    print(f"{'makespan / bound':<44}" + "".join(f"| seed {seed:<6}" for seed in seeds) + "| max")
    for profile in profiles:
        for latency in latencies:
            for kind in args.estimates.split(","):
                for order in args.order.split(","):
                    row = {r["seed"]: r["makespan_over_lb"] for r in results if r["profile"] == profile and
                           r["latency_s"] == latency and r["estimates"] == kind and r["order"] == order}
                    label = f"{profile} {order} {kind} lat {latency:g}"
                    print(f"{label:<44}" + "".join(f"| {row[seed]:<11}" for seed in seeds) + f"| {max(row.values())}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
