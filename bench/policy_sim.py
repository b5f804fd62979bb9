"""The scheduling policy alone: makespan / LB* of the real `Scheduler` in a simulated run, per seed.

    .venv/bin/python bench/policy_sim.py [--specs 300] [--seeds 1,2,3,4,5,6] [--latency 0,0.05,0.1]
        [--slots 8,8,8,8,20,40,48]

Draws the same projects as bench/schedule.py (bench/workload.py), loads them with the real parser, and
runs `Scheduler.pick()` / `succeed()` on a simulated clock: a spec picked at t ends at t + latency +
its duration + latency (latency: the dispatcher's cost on each side of a spec). Latency 0 is the policy's
own limit; comparing with the measured runs shows how much of the gap is latency. Prints a table and
writes bench/out/policy_sim.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import DEFAULT_SLOTS, parse_slots  # noqa: E402
from workload import generate, write_project  # noqa: E402

from dispatch.dag import load_project  # noqa: E402
from dispatch.scheduler import NodeSlots, Scheduler  # noqa: E402


def simulate(specs: int, seed: int, slots: list[int], latency: float, base: Path) -> dict:
    workload = generate(specs, seed)
    specs_dir = base / f"sim-s{seed}"
    write_project(workload, specs_dir, base / "timeline")
    project = load_project(specs_dir.name, specs_dir)
    duration = {spec.task_id: spec.seconds for spec in workload.specs}
    now = [0.0]
    scheduler = Scheduler(project, set(project.specs),
                          [NodeSlots(f"n{i}", count, frozenset(), 0, None) for i, count in enumerate(slots)],
                          clock=lambda: now[0])
    ends: list[tuple[float, str]] = []
    while not scheduler.done:
        for assignment in scheduler.pick():
            heapq.heappush(ends, (now[0] + 2 * latency + duration[assignment.task_id], assignment.task_id))
        if not ends:
            raise RuntimeError(f"seed {seed}: nothing running and nothing picked")
        now[0], task_id = heapq.heappop(ends)
        scheduler.succeed(task_id)
    bound = workload.lower_bound(sum(slots))
    return {"seed": seed, "latency_s": latency, "makespan_s": round(now[0], 2), "lb_s": bound["lb_s"],
            "busiest_lock_s": bound["busiest_lock_s"], "makespan_over_lb": round(now[0] / bound["lb_s"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=300)
    parser.add_argument("--seeds", default="1,2,3,4,5,6")
    parser.add_argument("--latency", default="0,0.05,0.1", help="seconds added on each side of every spec")
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "policy_sim.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    latencies = [float(x) for x in args.latency.split(",")]
    slots = parse_slots(args.slots)
    with tempfile.TemporaryDirectory(prefix="policy-sim-") as tmp:
        results = [simulate(args.specs, seed, slots, latency, Path(tmp)) for seed in seeds for latency in latencies]
    print(f"{'makespan / LB*':<22}" + "".join(f"| seed {seed:<6}" for seed in seeds))
    for latency in latencies:
        row = {r["seed"]: r["makespan_over_lb"] for r in results if r["latency_s"] == latency}
        print(f"{f'latency {latency:g} s':<22}" + "".join(f"| {row[seed]:<11}" for seed in seeds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
