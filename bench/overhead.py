"""Pure dispatcher overhead: N zero-length shell specs (`sleep 0`), no dependencies, no file locks.

    .venv/bin/python bench/overhead.py [--specs 100] [--where local,cluster] [--slots 8,8,8,8,20,40,48]
        [--server sqlite|postgres]

`local`: the embedded local node only (no nodes.json; DISPATCH_LOCAL_SLOTS=--local-slots).
`cluster`: the loopback cluster's nodes.json. Uses PREFECT_API_URL when set (else the embedded API).
Reports total wall (process start to exit), flow time (the flow's own start to end, from its state file),
specs per second over the flow time, per-spec overhead = flow time x slots in use / N is NOT assumed:
we report flow_s / N (seconds of flow per spec, the serial cost) and the dispatcher's CPU seconds per spec,
and the machine's CPU busy fraction during the run (/proc/stat; this machine has 2 cores).
Writes bench/out/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import DEFAULT_SLOTS, parse_slots, start_cluster  # noqa: E402
from measures import read_runs, summary  # noqa: E402
from schedule import DISPATCH, run_measured  # noqa: E402
from servers import KINDS, stop_home_server, throwaway_server  # noqa: E402
from workload import GenSpec, Workload, write_project  # noqa: E402


def cpu_times() -> tuple[float, float]:
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields), idle


def run(where: str, count: int, base: Path, nodes_json: Path | None, local_slots: int) -> dict:
    work = base / where
    home, specs = work / "home", work / "specs"
    home.mkdir(parents=True)
    if nodes_json is not None:
        (home / "nodes.json").write_text(nodes_json.read_text())
    timeline = work / "timeline"
    workload = Workload(0, [GenSpec(f"S{i:05d}", 0, 0.0, 2) for i in range(count)])
    project = f"noop-{where}"
    write_project(workload, specs / project, timeline)
    env = {**os.environ, "DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs),
           "DISPATCH_PROJECTS": str(work / "projects"), "DISPATCH_LOCAL_SLOTS": str(local_slots)}
    total0, idle0 = cpu_times()
    try:
        usage = run_measured([DISPATCH, "start", project], env, work / "rusage.json", work / "run.log", 900)
    finally:
        stop_home_server(env)
    total1, idle1 = cpu_times()
    state = json.loads((home / "state" / f"{project}.json").read_text())
    flow_s = (state.get("ended_at") or state["updated_at"]) - state["started_at"]
    runs = read_runs(timeline)
    starts = sorted(r[0][0] for r in runs.values())
    rows = state["specs"]
    dispatched_to_started = [runs[t][-1][0] - r["dispatched_at"] for t, r in rows.items()
                             if r.get("dispatched_at") and t in runs]
    ended_to_noticed = [r["ended_at"] - runs[t][-1][1] for t, r in rows.items()
                        if r.get("ended_at") and t in runs and runs[t][-1][1]]
    return {
        "where": where, "specs": count, "succeeded": sum(r["state"] == "succeeded" for r in rows.values()),
        "wall_s": round(usage["wall_s"], 2), "flow_s": round(flow_s, 2),
        "startup_s": round(state["started_at"] - usage["started_at"], 2),
        "first_to_last_start_s": round(starts[-1] - starts[0], 2) if starts else None,
        "specs_per_s": round(count / flow_s, 2), "flow_s_per_spec": round(flow_s / count, 3),
        "dispatcher_cpu_s": round(usage["cpu_s"], 2), "dispatcher_cpu_s_per_spec": round(usage["cpu_s"] / count, 3),
        "peak_rss_mib": round(usage["peak_rss_mib"], 1),
        "machine_cpu_busy": round(1 - (idle1 - idle0) / (total1 - total0), 3),
        "dispatched_to_started_s": summary(dispatched_to_started), "ended_to_noticed_s": summary(ended_to_noticed),
        "ssh_connections": state.get("ssh_connections"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=100)
    parser.add_argument("--where", default="local,cluster")
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--local-slots", type=int, default=8)
    parser.add_argument("--server", choices=KINDS, default=None,
                        help="run against a throwaway prefect server on SQLite or PostgreSQL (default: ambient)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "overhead.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="dispatch-overhead-") as tmp, \
            throwaway_server(args.server, Path(tmp)) as api_url:
        base = Path(tmp)
        for where in args.where.split(","):
            if where == "cluster":
                with start_cluster(parse_slots(args.slots), base / "cluster") as cluster:
                    results.append(run(where, args.specs, base, cluster.nodes_json, args.local_slots))
            else:
                results.append(run(where, args.specs, base, None, args.local_slots))
            print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"api": args.server or api_url or "embedded", "results": results},
                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
