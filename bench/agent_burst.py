"""A burst of run requests to one node agent (`runner.pyz serve`): how long until each is started.

    .venv/bin/python bench/agent_burst.py [--count 40] [--history 0] [--runner PATH/runner.pyz]
        [--rounds 3]

Starts the agent as the SSH transport does (without SSH: its stdin and stdout are pipes), sends `--count` run
requests of a shell spec at once, and reports the time from sending to the agent's "started" event and to the
spec's own first line (it echoes a timestamp). A burst is what a node sees when a spec with many dependents
ends, or at a project's start. `--history N` leaves N finished run directories under the root first, as a
node that has run projects before has them. `--runner` takes another runner (a zipapp, or an older
checkout's node_runner.py) for a before/after figure; by default this checkout's zipapp, written to a
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def burst(runner: Path, count: int, history: int) -> dict:
    root = tempfile.mkdtemp(prefix="agent-burst-")
    for number in range(history):  # what earlier runs left: a run directory each, its lock free
        old = Path(root, "earlier", "tasks", f"T{number:05d}")
        old.mkdir(parents=True)
        (old / ".runner.lock").write_text("1\n")
        (old / "status.json").write_text('{"state": "succeeded"}\n')
    timeline = os.path.join(root, "timeline")
    agent = subprocess.Popen([sys.executable, str(runner), "serve", "--root", root, "--slots", str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        sent = {}
        for number in range(1, count + 1):
            run_dir = os.path.join(root, "p", "tasks", f"S{number:04d}")
            task = {"acceptance": [], "attempt": 1, "cache_key": f"k{number}", "env": {}, "fresh": False,
                    "heartbeat": 2.0, "project": "p", "run_id": f"r{number}", "stall_timeout": 600.0,
                    "task_id": f"S{number:04d}", "timeout": 60.0, "verify": [], "workdir": f"{run_dir}/work",
                    "steps": [{"name": "shell",
                               "script": f'echo "{number} $(date +%s.%N)" >> {timeline}\nsleep 0.5\n'}]}
            sent[number] = time.time()
            request = {"op": "run", "id": number, "run_dir": run_dir, "task": task}
            agent.stdin.write((json.dumps(request) + "\n").encode())
        agent.stdin.flush()
        started, ended = {}, 0
        while ended < count:
            event = json.loads(agent.stdout.readline())
            if event["event"] == "started":
                started[event["id"]] = time.time()
            elif event["event"] in ("result", "error", "full", "earlier"):
                ended += 1
                if event["event"] != "result":
                    raise SystemExit(f"request {event['id']}: {event}")
        echoed = {int(n): float(t) for n, t in (line.split() for line in Path(timeline).read_text().splitlines())}
    finally:
        agent.stdin.close()
        agent.wait()
        shutil.rmtree(root, ignore_errors=True)
    to_started = sorted(started[n] - sent[n] for n in started)
    to_echo = sorted(echoed[n] - sent[n] for n in echoed)
    return {"to_started_median_s": round(statistics.median(to_started), 3),
            "to_started_max_s": round(to_started[-1], 3), "to_spec_median_s": round(statistics.median(to_echo), 3),
            "to_spec_max_s": round(to_echo[-1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--history", type=int, default=0, help="finished run directories under the root first")
    parser.add_argument("--runner", type=Path, default=None)
    args = parser.parse_args()
    if args.runner is None:
        from dispatch.cluster.shipping import local_runner

        args.runner = local_runner(Path(tempfile.mkdtemp(prefix="agent-burst-runner-")))
    for _ in range(args.rounds):
        print(json.dumps(burst(args.runner.resolve(), args.count, args.history)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
