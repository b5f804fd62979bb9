"""The main benchmark: schedule quality and latency of ours vs a plain-Prefect baseline, per seed.

    PREFECT_API_URL=http://127.0.0.1:<port>/api .venv/bin/python bench/schedule.py \
        --specs 300 --seeds 1,2,3 [--scale 1.0] [--slots 8,8,8,8,20,40,48] [--only ours|baseline] \
        [--server sqlite|postgres] [--profile standard|lock-heavy|standard,lock-heavy] [--history] [--code DIR]

Starts the loopback cluster (bench/cluster.py), and for each seed draws a project (bench/workload.py),
runs it with ours (`dispatch start`, a subprocess, with DISPATCH_HOME/SPECS/PROJECTS in a temp dir and
the cluster's nodes.json) and with the baseline (bench/baseline_flow.py), each under bench/rusage.py
(peak RSS and CPU seconds of the dispatcher process and what it waited for), and judges both from the
timelines the specs wrote. Prints a table and writes bench/out/schedule.json.
With no PREFECT_API_URL, ours runs on its embedded default and the baseline is skipped (it needs a
server for global concurrency limits); `--server sqlite|postgres` starts a throwaway `prefect server` on 127.0.0.1.
`--profile lock-heavy` draws 30 % of the specs on 40 files (bench/workload.py); `--profile standard,lock-heavy`
runs both, one after the other on the same cluster, into one table. `--history` gives ours the
durations of an earlier run of the same project (its `results/<project>/durations.json`, the drawn durations),
as a team that runs a project again has; without it ours starts with no estimate. `--code DIR` runs ours from
another checkout (PYTHONPATH; e.g. `git archive <rev> | tar -x -C DIR` for a before/after table). The bound is
bench/bounds.py's (critical path, work / slots, Jackson's per-file bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import DEFAULT_SLOTS, parse_slots, start_cluster  # noqa: E402
from measures import schedule_measures, summary  # noqa: E402
from servers import KINDS, stop_home_server, throwaway_server  # noqa: E402
from workload import PROFILES, generate_named, write_project  # noqa: E402

PY = sys.executable
DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def phases(state_file: Path, timeline_runs: dict) -> dict:
    """Where ours spends a spec's latency, from the flow's state file and the timeline."""
    state = json.loads(state_file.read_text())
    rows = state["specs"]
    to_dispatch, to_start, to_notice = [], [], []
    for task_id, row in rows.items():
        runs = timeline_runs.get(task_id)
        if not runs:
            continue
        start, end = runs[-1][0], runs[-1][1]
        if row.get("ready_at") and row.get("dispatched_at"):
            to_dispatch.append(row["dispatched_at"] - row["ready_at"])
        if row.get("dispatched_at"):
            to_start.append(start - row["dispatched_at"])
        if row.get("ended_at") and end:
            to_notice.append(row["ended_at"] - end)
    return {"ready_to_dispatched_s": summary(to_dispatch), "dispatched_to_started_s": summary(to_start),
            "ended_to_noticed_s": summary(to_notice), "ssh_connections": state.get("ssh_connections"),
            "flow_s": round((state.get("ended_at") or state["updated_at"]) - state["started_at"], 2)}


def write_history(directory: Path, workload) -> None:
    """`durations.json` as an earlier run of the drawn project would have left it (dispatch/core/durations.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    runs = {s.task_id: [{"seconds": s.seconds, "succeeded": True, "model": "shell", "at": 0}] for s in workload.specs}
    (directory / "durations.json").write_text(json.dumps({"version": 1, "specs": runs}))


def run_measured(command: list[str], env: dict, out: Path, log: Path, timeout: float) -> dict:
    with open(log, "wb") as handle:
        proc = subprocess.Popen([PY, str(ROOT / "bench" / "rusage.py"), str(out), "--", *command], env=env,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return {"exit_code": "timeout", "wall_s": timeout}
    return json.loads(out.read_text())


def run_seed(seed: int, args, cluster, base: Path, api_url: str | None, profile: str = "standard") -> dict:
    from measures import read_runs

    workload = generate_named(profile, args.specs, seed, scale=args.scale, min_s=args.min_s, max_s=args.max_s)
    slots = {n["name"]: n["slots"] for n in cluster.nodes}
    result = {"seed": seed, "profile": profile, "lower_bound": workload.lower_bound(sum(slots.values()))}
    project = f"bench-s{seed}" if profile == "standard" else f"bench-{profile}-s{seed}"
    if args.only in (None, "ours"):
        work = base / f"ours-{project}"
        home, specs = work / "home", work / "specs"
        home.mkdir(parents=True)
        (home / "nodes.json").write_text(cluster.nodes_json.read_text())
        timeline = work / "timeline"
        write_project(workload, specs / project, timeline)
        env = {**os.environ, "DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs),
               "DISPATCH_PROJECTS": str(work / "projects"), "DISPATCH_RETRY_DELAY": "0.5"}
        if args.history:
            write_history(home / "results" / project, workload)
        if args.code:
            env["PYTHONPATH"] = str(args.code.resolve())
        if api_url:
            env["PREFECT_API_URL"] = api_url
        else:
            env.pop("PREFECT_API_URL", None)
        try:
            usage = run_measured([DISPATCH, "start", project], env, work / "rusage.json", work / "run.log",
                                 args.timeout)
        finally:
            stop_home_server(env)
        measures = schedule_measures(workload, timeline, slots)
        state_file = home / "state" / f"{project}.json"
        if state_file.exists():
            measures["phases"] = phases(state_file, read_runs(timeline))
        measures["startup_s"] = round(measures.get("first_start", usage.get("started_at", 0)) -
                                      usage.get("started_at", 0), 2) if "started_at" in usage else None
        result["ours"] = {**usage, **measures}
    if args.only in (None, "baseline") and api_url:
        work = base / f"baseline-{project}"
        specs_dir = work / "specs" / project
        timeline = work / "timeline"
        write_project(workload, specs_dir, timeline)
        env = {**os.environ, "PREFECT_API_URL": api_url}
        usage = run_measured([PY, str(ROOT / "bench" / "baseline_flow.py"), "--specs-dir", str(specs_dir),
                              "--nodes", str(cluster.nodes_json)], env, work / "rusage.json", work / "run.log",
                             args.timeout)
        measures = schedule_measures(workload, timeline, slots)
        measures["startup_s"] = round(measures["first_start"] - usage["started_at"], 2) \
            if "first_start" in measures and "started_at" in usage else None
        result["baseline"] = {**usage, **measures}
    return result


ROWS = [("makespan (s)", ("makespan_s",)), ("wall incl. start-up (s)", ("wall_s",)), ("bound (s)", ("lb_s",)),
        ("plain LB* (s)", ("plain_lb_s",)), ("makespan / bound", ("makespan_over_lb",)),
        ("utilisation", ("utilisation",)), ("utilisation, lock-aware", ("utilisation_lock_aware",)),
        ("ready->run median (s)", ("ready_to_running_s", "median")),
        ("ready->run p95 (s)", ("ready_to_running_s", "p95")),
        ("ready->run max (s)", ("ready_to_running_s", "max")),
        ("ready->run p95, lock-aware (s)", ("ready_to_running_lock_aware_s", "p95")),
        ("peak RSS (MiB)", ("peak_rss_mib",)),
        ("CPU (s)", ("cpu_s",)), ("specs finished", ("finished",)), ("lock overlaps", ("lock_overlaps",)),
        ("slot overruns", ("slot_overruns",))]


def _get(data: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def table(results: list[dict]) -> str:
    def name(r: dict) -> str:
        return f"seed {r['seed']}" if r.get("profile", "standard") == "standard" else f"{r['profile']} {r['seed']}"

    lines = [f"{'measure':<31}" + "".join(f"| {name(r)}: ours / baseline / ratio ".ljust(44) for r in results)]
    for label, path in ROWS:
        cells = []
        for r in results:
            ours, base = _get(r.get("ours"), path), _get(r.get("baseline"), path)
            ratio = (f"{ours / base:.2f}" if isinstance(ours, (int, float)) and isinstance(base, (int, float))
                     and base else "-")
            fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
            cells.append(f"| {fmt(ours)} / {fmt(base)} / {ratio}".ljust(44))
        lines.append(f"{label:<31}" + "".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=300)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--min-s", type=float, default=1.0)
    parser.add_argument("--max-s", type=float, default=4.0)
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--only", choices=["ours", "baseline"], default=None)
    parser.add_argument("--profile", default="standard", help=f"one of {', '.join(sorted(PROFILES))}, or several "
                        "separated by commas")
    parser.add_argument("--history", action="store_true", help="ours starts with an earlier run's durations")
    parser.add_argument("--code", type=Path, default=None, help="run ours from this checkout (PYTHONPATH)")
    parser.add_argument("--server", choices=KINDS, default=None,
                        help="start a throwaway prefect server on 127.0.0.1 (on SQLite or a throwaway PostgreSQL)")
    parser.add_argument("--timeout", type=float, default=400.0, help="per run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "schedule.json")
    args = parser.parse_args()
    profiles = [p for p in args.profile.split(",") if p]
    if not profiles or set(profiles) - set(PROFILES):
        parser.error(f"--profile: choose from {', '.join(sorted(PROFILES))}, got {args.profile!r}")
    base = Path(tempfile.mkdtemp(prefix="dispatch-schedule-"))
    results = []
    try:
        with throwaway_server(args.server, base) as api_url, \
                start_cluster(parse_slots(args.slots), base / "cluster") as cluster:
            for profile, seed in [(p, int(s)) for p in profiles for s in args.seeds.split(",")]:
                result = run_seed(seed, args, cluster, base, api_url, profile)
                results.append(result)
                print(json.dumps(result, default=str)[:4000], file=sys.stderr, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"api": api_url or "embedded", "specs": args.specs,
                                                "scale": args.scale, "slots": args.slots, "profile": args.profile,
                                                "history": args.history, "code": str(args.code or ROOT),
                                                "results": results}, indent=2, default=str) + "\n")
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
