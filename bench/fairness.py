"""Team fairness: a small project started beside a large one, against the same small project alone.

    .venv/bin/python bench/fairness.py [--slots 3,3,3] [--big 300] [--small 5] [--small-seconds 2] [--code DIR]
                                       [--team]

Starts the loopback cluster (3 nodes of 3 slots: 9), and on the embedded default (one DISPATCH_HOME, so both
dispatchers meet in this machine's slot and share files), or with `--team` in team mode (a Prefect server on
PostgreSQL started for the run, and two DISPATCH_HOMEs, as two users on two machines: they meet only through
the server's slot limits and share variables):
1. the small project alone (`--small` shell specs of `--small-seconds`, no dependencies);
2. the large project (bench/workload.py, `--big` specs of 1-4 s), and once every slot is busy, the small one.
The small project's span is its first spec's start to its last spec's end (the specs' own timestamps). The
target: beside the large one, at most 1.3 x its span alone + the longest spec of the large one (the wait for
slots to free: running specs are never stopped). `--code DIR` runs both dispatchers from another checkout
(PYTHONPATH), for the figure before a change. Writes bench/out/fairness.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from cluster import parse_slots, start_cluster  # noqa: E402
from measures import read_runs, write_result  # noqa: E402
from servers import stop_home_server, throwaway_server  # noqa: E402
from workload import generate, shell_script, write_project  # noqa: E402

DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def write_small(specs_dir: Path, count: int, seconds: float, timeline: Path) -> None:
    specs_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        task_id = f"S{index:02d}"
        script = shell_script(type("Spec", (), {"task_id": task_id, "seconds": seconds})(), timeline)
        (specs_dir / f"{task_id}.md").write_text(f"---\ntask_id: {task_id}\nkind: shell\n---\n## Goal\nsmall\n\n"
                                                 f"```bash\n{script}```\n")


def span(timeline: Path) -> dict:
    runs = read_runs(timeline)
    starts = [s for r in runs.values() for s, _, _ in r]
    ends = [e for r in runs.values() for _, e, _ in r if e is not None]
    return {"span_s": round(max(ends) - min(starts), 2), "first_start": min(starts), "last_end": max(ends),
            "specs": len(runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", default="3,3,3")
    parser.add_argument("--big", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--small", type=int, default=5)
    parser.add_argument("--small-seconds", type=float, default=2.0)
    parser.add_argument("--code", type=Path, default=None, help="run the dispatchers from this checkout")
    parser.add_argument("--team", action="store_true", help="two users through a Prefect server (team mode)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/out/fairness[-team].json")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "out" / ("fairness-team.json" if args.team else "fairness.json")
    with tempfile.TemporaryDirectory(prefix="dispatch-fairness-") as tmp, \
            start_cluster(parse_slots(args.slots), Path(tmp) / "cluster") as cluster, \
            throwaway_server("postgres" if args.team else None, Path(tmp)) as api_url:
        base = Path(tmp)
        specs = base / "specs"
        envs = {}
        for user in ("big", "small"):
            home = base / (f"home-{user}" if args.team else "home")  # embedded: one home for both
            home.mkdir(exist_ok=True)
            (home / "nodes.json").write_text(cluster.nodes_json.read_text())
            env = {**os.environ, "DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs),
                   "DISPATCH_PROJECTS": str(base / "projects"), "DISPATCH_RETRY_DELAY": "0.5"}
            if args.team:
                env["PREFECT_API_URL"] = api_url
            else:
                env.pop("PREFECT_API_URL", None)
            if args.code:
                env["PYTHONPATH"] = str(args.code.resolve())
            envs[user] = env
        if args.team:  # the nodes' slot limits on the server, as an operator makes them
            subprocess.run([DISPATCH, "nodes", "sync"], env=envs["big"], capture_output=True, check=True)
        env = envs["small"]
        write_small(specs / "small-alone", args.small, args.small_seconds, base / "alone.timeline")
        alone = subprocess.run([DISPATCH, "start", "small-alone"], env=env, capture_output=True, text=True)
        if alone.returncode != 0:
            print(alone.stdout[-2000:], alone.stderr[-2000:], file=sys.stderr)
            return 1
        workload = generate(args.big, args.seed)
        write_project(workload, specs / "big", base / "big.timeline")
        write_small(specs / "small", args.small, args.small_seconds, base / "small.timeline")
        with open(base / "big.log", "wb") as log:
            big = subprocess.Popen([DISPATCH, "start", "big"], env=envs["big"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            total = sum(n["slots"] for n in cluster.nodes)
            deadline = time.monotonic() + 300
            while len(read_runs(base / "big.timeline")) < 2 * total and time.monotonic() < deadline:
                time.sleep(0.2)  # every slot busy, and the big project well under way
            small_started = time.time()
            beside = subprocess.run([DISPATCH, "start", "small"], env=env, capture_output=True, text=True)
            big_running = big.poll() is None
        finally:
            subprocess.run([DISPATCH, "stop", "big"], env=envs["big"], capture_output=True, timeout=120)
            big.wait(timeout=120)
            for each in envs.values():
                stop_home_server(each)
        if beside.returncode != 0:
            print(beside.stdout[-2000:], beside.stderr[-2000:], file=sys.stderr)
            return 1
        alone_span, beside_span = span(base / "alone.timeline"), span(base / "small.timeline")
        longest = max(s.seconds for s in workload.specs)
        target = 1.3 * alone_span["span_s"] + longest
        result = {"mode": "team" if args.team else "embedded", "slots": parse_slots(args.slots),
                  "small_specs": args.small, "small_seconds": args.small_seconds,
                  "big_specs": args.big, "alone": alone_span, "beside": beside_span,
                  "big_still_running_when_small_ended": big_running, "longest_big_spec_s": longest,
                  "target_s": round(target, 2), "met": beside_span["span_s"] <= target,
                  "small_start_up_s": round(beside_span["first_start"] - small_started, 2),
                  "code": str(args.code or ROOT)}
    write_result(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
