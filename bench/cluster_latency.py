"""Dispatch latency on a loopback cluster: N short shell specs over real sshd nodes.

    .venv/bin/python bench/cluster_latency.py --specs 100 --seconds 0.5 --slots 2,3,4 [--layers 4]

Starts the nodes (rigs/loopback_cluster.py), writes a project of N shell specs in `--layers`
dependency layers (each spec depends on one of the previous layer), runs `dispatch start` on the
embedded default (or on PREFECT_API_URL when set), and prints, from the timestamps the specs record
themselves: wall time, makespan of the flow, ready->running latency (median, p95, max), the gap
between a slot freeing and the next spec starting on it, and the SSH connections opened.
Only loopback addresses are used. Results are also written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from measures import write_result  # noqa: E402
from servers import stop_home_server  # noqa: E402

from rigs.loopback_cluster import LoopbackCluster  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def write_project(specs_dir: Path, count: int, layers: int, seconds: float, timeline: Path) -> None:
    specs_dir.mkdir(parents=True)
    per_layer = max(1, count // layers)
    for i in range(count):
        layer = min(i // per_layer, layers - 1)
        deps = [f"S{(layer - 1) * per_layer + (i % per_layer):04d}"] if layer > 0 else []
        script = (f'echo "$DISPATCH_TASK_ID start $(date +%s.%N) $DISPATCH_NODE" >> {timeline}\n'
                  f"sleep {seconds}\n"
                  f'echo "$DISPATCH_TASK_ID end $(date +%s.%N) $DISPATCH_NODE" >> {timeline}\n')
        front = f"---\ntask_id: S{i:04d}\nkind: shell\ndepends_on: {json.dumps(deps)}\n---\n"
        (specs_dir / f"S{i:04d}.md").write_text(f"{front}## Goal\nbench\n\n```bash\n{script}```\n")


def measure(home: Path, timeline: Path, project: str, nodes: dict[str, int]) -> dict:
    state = json.loads((home / "state" / f"{project}.json").read_text())
    starts, ends, on_node = {}, {}, {}
    for line in timeline.read_text().splitlines():
        task_id, what, stamp, node = line.split()
        (starts if what == "start" else ends)[task_id] = float(stamp)
        on_node[task_id] = node
    ready = [starts[t] - row["ready_at"] for t, row in state["specs"].items() if row.get("ready_at") and t in starts]
    gaps = []
    for node in nodes:
        runs = sorted((starts[t], ends[t]) for t in starts if on_node[t] == node and t in ends)
        frees = sorted(e for _, e in runs)
        for start, _ in runs:
            earlier = [f for f in frees if f <= start]
            if earlier and start - earlier[-1] < 30:
                gaps.append(start - earlier[-1])
    submit = [starts[t] - row["dispatched_at"] for t, row in state["specs"].items()
              if row.get("dispatched_at") and t in starts]
    notice = [row["ended_at"] - ends[t] for t, row in state["specs"].items() if row.get("ended_at") and t in ends]
    def summary(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 3), "p95": round(_percentile(values, 0.95), 3)}

    return {
        "submit_to_start_s": summary(submit),
        "end_to_dispatcher_s": summary(notice),
        "specs": len(state["specs"]), "succeeded": sum(r["state"] == "succeeded" for r in state["specs"].values()),
        "flow_makespan_s": round(max(ends.values()) - min(starts.values()), 2),
        "dispatcher_s": round((state["ended_at"] or state["updated_at"]) - state["started_at"], 2),
        "ready_to_running_s": {"median": round(statistics.median(ready), 3), "p95": round(_percentile(ready, 0.95), 3),
                               "max": round(max(ready), 3)},
        "slot_free_to_next_start_s": {"median": round(statistics.median(gaps), 3) if gaps else None,
                                      "p95": round(_percentile(gaps, 0.95), 3) if gaps else None},
        "ssh_connections": state.get("ssh_connections"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--slots", default="2,3,4")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cluster_latency.json")
    args = parser.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp, LoopbackCluster() as cluster:
        base = Path(tmp)
        cluster.start(slots, base / "cluster", port=0)
        home, specs, timeline = base / "home", base / "specs", base / "timeline"
        home.mkdir()
        (home / "nodes.json").write_text(cluster.nodes_json.read_text())
        write_project(specs / "bench", args.specs, args.layers, args.seconds, timeline)
        env = {**os.environ, "DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs),
               "DISPATCH_PROJECTS": str(base / "projects")}
        started = time.monotonic()
        try:
            done = subprocess.run([str(Path(sys.executable).with_name("dispatch")), "start", "bench"], env=env,
                                  capture_output=True, text=True)
        finally:
            stop_home_server(env)
        wall = time.monotonic() - started
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        result = {"wall_s": round(wall, 2), "slots": slots, "seconds_per_spec": args.seconds, "layers": args.layers,
                  "lower_bound_s": round(max(args.layers * args.seconds, args.specs * args.seconds / sum(slots)), 2),
                  **measure(home, timeline, "bench", {n["name"]: n["slots"] for n in cluster.nodes})}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
