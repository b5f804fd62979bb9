"""Scale: N specs (default 5,000) parsed, validated and planned, then a simulated full run of the scheduler.

    .venv/bin/python bench/scale.py [--specs 5000] [--seed 1] [--slots 8,8,8,8,20,40,48]

Writes a seeded project (bench/workload.py) to a temp dir, then times, in this process:
`load_project` (parse + validate every spec: YAML, types, dependencies, cycles), `critical_path`,
`Scheduler(...)` construction (ready queue, priorities), and a simulated run: `pick()` / `succeed()` on a
virtual clock with the drawn durations until every spec is done (no Prefect, no SSH: the scheduler's own
cost, with the per-event calls the flow makes: next_wakeup, unplaceable, pick). Timed without tracemalloc;
peak memory from ru_maxrss (whole process) and from a second, untimed tracemalloc pass of parse + plan.
Writes bench/out/scale.json.
"""

from __future__ import annotations

import argparse
import heapq
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import DEFAULT_SLOTS, parse_slots  # noqa: E402
from measures import write_result  # noqa: E402
from workload import generate, write_project  # noqa: E402

from dispatch.core.dag import load_project  # noqa: E402
from dispatch.core.placement import NodeSlots  # noqa: E402
from dispatch.core.scheduler import Scheduler  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--cyaml", action="store_true",
                        help="what-if: make dispatch.core.specs parse front matter with libyaml's CSafeLoader")
    parser.add_argument("--sim", action=argparse.BooleanOptionalAction, default=True,
                        help="also simulate the full pick/succeed run (default on)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale.json")
    args = parser.parse_args()
    if args.cyaml:  # benchmark-only patch of the parser's YAML loader (dispatch/ is not changed)
        import yaml

        import dispatch.core.specs
        dispatch.core.specs.yaml = type("yaml_c", (), {"safe_load": staticmethod(
            lambda text: yaml.load(text, Loader=yaml.CSafeLoader)), "YAMLError": yaml.YAMLError})
    workload = generate(args.specs, args.seed)
    durations = {s.task_id: s.seconds for s in workload.specs}
    with tempfile.TemporaryDirectory(prefix="dispatch-scale-") as tmp:
        specs_dir = Path(tmp) / "scale"
        write_project(workload, specs_dir, Path(tmp) / "timeline")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        project = load_project("scale", specs_dir)
        t1 = time.perf_counter()
        chain = project.critical_path(durations)
        t2 = time.perf_counter()
        now = [0.0]
        nodes = [NodeSlots(f"loop{i + 1}", n) for i, n in enumerate(parse_slots(args.slots))]
        scheduler = Scheduler(project, set(project.specs), nodes, clock=lambda: now[0])
        t3 = time.perf_counter()
        running: list[tuple[float, str]] = []
        picks = 0
        events = 0
        while args.sim and not scheduler.done:  # as the flow's loop does per event: wakeup, unplaceable, pick
            events += 1
            scheduler.next_wakeup()
            scheduler.unplaceable()
            for assignment in scheduler.pick():
                picks += 1
                heapq.heappush(running, (now[0] + durations[assignment.task_id], assignment.task_id))
            if not running:
                raise RuntimeError("simulation stalled")
            now[0], task_id = heapq.heappop(running)
            scheduler.succeed(task_id)
            while running and running[0][0] <= now[0]:
                scheduler.succeed(heapq.heappop(running)[1])
        t4 = time.perf_counter()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        del scheduler, project
        tracemalloc.start()  # a second pass for Python allocations (tracemalloc slows it: not timed)
        project = load_project("scale", specs_dir)
        Scheduler(project, set(project.specs), nodes)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    lb = workload.lower_bound(sum(n.slots for n in nodes))
    result = {
        "specs": args.specs, "cyaml": args.cyaml, "parse_validate_s": round(t1 - t0, 3),
        "critical_path_s": round(t2 - t1, 3),
        "scheduler_init_s": round(t3 - t2, 3), "parse_validate_plan_s": round(t3 - t0, 3),
        "simulated_run_s": round(t4 - t3, 3), "picks": picks, "events": events,
        "scheduler_ms_per_event": round((t4 - t3) / max(events, 1) * 1000, 2), "simulated_makespan_s": round(now[0], 2),
        "lower_bound_s": lb["lb_s"], "simulated_makespan_over_lb": round(now[0] / lb["lb_s"], 3),
        "tracemalloc_peak_mib": round(peak / 2 ** 20, 1), "ru_maxrss_mib": round(rss, 1),
        "ru_maxrss_before_mib": round(rss_before, 1), "max_chain": round(max(chain.values()), 2),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
