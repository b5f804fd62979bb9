"""Reliability in the benchmark harness: kill the dispatcher mid-run and restart it; kill a node mid-run.

    .venv/bin/python bench/reliability.py [--specs 80] [--slots 8,8,8,8,20,40,48] [--only dispatcher|node]

`dispatcher`: `dispatch start` on the loopback cluster; once a third of the specs have ended, SIGKILL the
dispatcher process (the node runners it started keep going on the nodes), then run `dispatch start`
again to the end. Judged from the timeline: specs that had finished before the kill and ran again (must
be 0), specs started twice in all, specs never finished (lost: must be 0).
`node`: `dispatch start`; once node --victim (default loop7, 48 slots: placement fills the nodes with the
most free slots first, so a small node may get no work) runs 3 specs, kill its sshd and everything started
through it (LoopbackCluster.kill); the project must still finish (exit 0, every spec succeeded).
Both also count lock overlaps and slot overruns (must be 0). Writes bench/out/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import DEFAULT_SLOTS, parse_slots, start_cluster  # noqa: E402
from measures import read_runs, schedule_measures  # noqa: E402
from schedule import DISPATCH  # noqa: E402
from servers import stop_home_server  # noqa: E402
from workload import generate, write_project  # noqa: E402


def setup(base: Path, name: str, cluster, count: int, seed: int):
    work = base / name
    home, specs = work / "home", work / "specs"
    home.mkdir(parents=True)
    (home / "nodes.json").write_text(cluster.nodes_json.read_text())
    timeline = work / "timeline"
    workload = generate(count, seed, min_s=2.0, max_s=6.0)
    write_project(workload, specs / name, timeline)
    env = {**os.environ, "DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs),
           "DISPATCH_PROJECTS": str(work / "projects"), "DISPATCH_RETRY_DELAY": "0.5"}
    return work, home, timeline, workload, env


def ended(timeline: Path) -> set[str]:
    return {t for t, runs in read_runs(timeline).items() if any(e is not None for _, e, _ in runs)}


def dispatcher_kill(base: Path, cluster, count: int, seed: int) -> dict:
    work, home, timeline, workload, env = setup(base, "rel-dispatcher", cluster, count, seed)
    log = open(work / "run1.log", "wb")  # noqa: SIM115
    first = subprocess.Popen([DISPATCH, "start", "rel-dispatcher"], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while len(ended(timeline)) < count // 3 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    finished_before = ended(timeline)
    running_at_kill = set(read_runs(timeline)) - finished_before
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.time()
    second = subprocess.run([DISPATCH, "start", "rel-dispatcher"], env=env, capture_output=True, text=True,
                            timeout=600)
    (work / "run2.log").write_text(second.stdout + second.stderr)
    runs = read_runs(timeline)
    slots = {n["name"]: n["slots"] for n in cluster.nodes}
    measures = schedule_measures(workload, timeline, slots)
    state = json.loads((home / "state" / "rel-dispatcher.json").read_text())
    stop_home_server(env)  # the embedded default leaves the home's server up
    return {
        "specs": count, "restart_exit_code": second.returncode,
        "finished_before_kill": len(finished_before), "running_at_kill": len(running_at_kill),
        "finished_rerun_after_restart": sum(1 for t in finished_before
                                            if any(s > killed_at for s, _, _ in runs.get(t, []))),
        "running_at_kill_started_again": sum(1 for t in running_at_kill if len(runs.get(t, [])) > 1),
        "specs_started_twice": sum(1 for r in runs.values() if len(r) > 1),
        "never_finished": count - len(ended(timeline)),
        "succeeded_in_state": sum(r["state"] == "succeeded" for r in state["specs"].values()),
        "lock_overlaps": measures["lock_overlaps"], "slot_overruns": measures["slot_overruns"],
    }


def node_kill(base: Path, cluster, count: int, seed: int, victim: str = "loop7") -> dict:
    work, home, timeline, workload, env = setup(base, "rel-node", cluster, count, seed)
    log = open(work / "run.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    run = subprocess.Popen([DISPATCH, "start", "rel-node"], env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        on_victim = [t for t, r in read_runs(timeline).items() if r[-1][2] == victim and r[-1][1] is None]
        if len(on_victim) >= 3:
            break
        time.sleep(0.1)
    cluster.kill(victim)
    killed = len(on_victim)
    code = run.wait(timeout=600)
    wall = time.monotonic() - started
    cluster.restart(victim)
    state = json.loads((home / "state" / "rel-node.json").read_text())
    rows = state["specs"].values()
    slots = {n["name"]: n["slots"] for n in cluster.nodes}
    measures = schedule_measures(workload, timeline, slots)
    stop_home_server(env)  # the embedded default leaves the home's server up
    return {
        "specs": count, "victim": victim, "exit_code": code, "wall_s": round(wall, 1),
        "running_on_victim_at_kill": killed,
        "succeeded": sum(r["state"] == "succeeded" for r in rows), "lost": count - len(ended(timeline)),
        "retried_specs": sum(1 for r in rows if (r.get("attempts") or 1) > 1),
        "max_attempts": max((r.get("attempts") or 1) for r in rows),
        "lock_overlaps": measures["lock_overlaps"], "slot_overruns": measures["slot_overruns"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=80)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--only", choices=["dispatcher", "node"], default=None)
    parser.add_argument("--victim", default="loop7", help="the node to kill in the node test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reliability.json")
    args = parser.parse_args()
    result = {"api": os.environ.get("PREFECT_API_URL", "embedded")}
    with tempfile.TemporaryDirectory(prefix="dispatch-reliability-") as tmp:
        base = Path(tmp)
        with start_cluster(parse_slots(args.slots), base / "cluster") as cluster:
            if args.only in (None, "dispatcher"):
                result["dispatcher_kill"] = dispatcher_kill(base, cluster, args.specs, args.seed)
                print(json.dumps(result["dispatcher_kill"]), flush=True)
            if args.only in (None, "node"):
                result["node_kill"] = node_kill(base, cluster, args.specs, args.seed + 1, args.victim)
                print(json.dumps(result["node_kill"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
