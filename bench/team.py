"""Team mode at scale: one, two or three users' dispatchers at once on one Prefect server on PostgreSQL.

    .venv/bin/python bench/team.py --specs 300 --users 1,2,3 --profiles standard,lock-heavy [--seed 1]
        [--slots 8,8,8,8,20,40,48] [--same-repo] [--code DIR] [--timeout 900] [--out bench/out/team.json]

Starts a throwaway PostgreSQL, a Prefect server on it that writes down every request it answers
(bench/team_server.py), and the loopback cluster (bench/cluster.py, 7 `sshd` nodes, 140 slots), makes the
nodes' slot limits on the server (`dispatch nodes sync`), then for each profile and each user count N runs a
round: N users (one DISPATCH_HOME each, as N machines) start `dispatch start <project>` at once, each with
its own drawn project of `--specs` specs (user k draws seed `--seed` + 1000 (k - 1)). `standard` is
bench/workload.py's profile; `lock-heavy` draws 30 % of the specs on 40 files, uniformly, with shell specs
of `--lock-heavy-min-s` (0.5) to 4 s. With `--same-repo` the users' projects share one lock table (one
project name: their `modifies` files are the same files); by default each run has its own.

Per run: makespan against its bound (bench/bounds.py) alone and given its share (the bound on slots / N),
and lock-aware ready -> start p50/p95 (bench/measures.py). Per round: the server's requests in the round's
window by phase (slot lease, lease records, fair-share board, server locks, ..., flow and task runs, logs,
events: count, calls per spec started, total ms, p50/p95 ms inside the server), and the same calls as the
dispatchers saw them, per thread (bench/team_hook/: the dispatch loop's calls are on its critical path, the
background threads' are not). The server and cluster stay up across rounds (later rounds meet a fuller
database). Writes `--out` (JSON) and prints markdown tables; `bench/team_report.py --summary <json>` prints the
per-phase table of docs/performance.md (issue 22) with a column per round.

Exits 1 when a round breaks a guarantee (a node running more specs of all users at once than its slots, or
two specs sharing a `modifies` file overlapping in time), or a dispatcher fails or times out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import DEFAULT_SLOTS, parse_slots, start_cluster  # noqa: E402
from team_measure import cpu_delta, cpu_snapshot, guarantees, route_tables, user_result  # noqa: E402
from team_report import print_round  # noqa: E402
from team_server import traced_server  # noqa: E402
from team_trace import read_trace  # noqa: E402
from workload import generate_named, write_project  # noqa: E402

DISPATCH = str(Path(sys.executable).with_name("dispatch"))
HOOK = ROOT / "bench" / "team_hook"
PROFILE_NAMES = ("standard", "lock-heavy")


def user_env(api_url: str, home: Path, work: Path, name: str, trace_dir: Path, code: Path | None) -> dict:
    """A dispatcher's environment: its own home, the team's server, a header naming it, the client hook."""
    env = {**os.environ, "DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(work / "specs"),
           "DISPATCH_PROJECTS": str(work / "projects"), "DISPATCH_RETRY_DELAY": "0.5", "PREFECT_API_URL": api_url,
           "PREFECT_CLIENT_CUSTOM_HEADERS": json.dumps({"X-Bench-User": name}),
           "BENCH_TEAM_CLIENT_TRACE": str(trace_dir)}
    paths = [str(HOOK)] + ([str(code.resolve())] if code else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_round(args, profile: str, count: int, cluster, server, base: Path, server_trace: Path) -> dict:
    """`count` users start their projects at once; returns the round's figures."""
    slots = {n["name"]: n["slots"] for n in cluster.nodes}
    round_dir = base / f"{profile}-{count}u"
    overrides = {"min_s": args.lock_heavy_min_s if profile == "lock-heavy" else args.min_s, "max_s": args.max_s}
    users, procs = [], []
    for k in range(1, count + 1):
        name, seed = f"u{k}", args.seed + 1000 * (k - 1)
        workload = generate_named(profile, args.specs, seed, **overrides)
        project = f"team-{profile}-s{args.seed}" if args.same_repo else f"team-{profile}-{name}-s{seed}"
        work = round_dir / name
        home = work / "home"
        home.mkdir(parents=True)
        (home / "nodes.json").write_text(cluster.nodes_json.read_text())
        timeline, trace_dir = work / "timeline", work / "client-trace"
        trace_dir.mkdir()
        write_project(workload, work / "specs" / project, timeline)
        users.append({"name": name, "seed": seed, "project": project, "workload": workload, "timeline": timeline,
                      "state_file": home / "state" / f"{project}.json", "log": work / "run.log",
                      "trace_dir": trace_dir, "env": user_env(server.url, home, work, name, trace_dir, args.code)})
    cpu_before = cpu_snapshot(server.server_pid, server.postgres_pid)
    started = time.time()
    for user in users:
        with open(user["log"], "wb") as log:
            procs.append(subprocess.Popen([DISPATCH, "start", user["project"]], env=user["env"], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + args.timeout
    for user, proc in zip(users, procs, strict=True):
        try:
            user["exit_code"] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            user["exit_code"] = "timeout"
    ended = time.time()
    cpu = cpu_delta(cpu_before, cpu_snapshot(server.server_pid, server.postgres_pid))
    time.sleep(1.0)  # the server's trace writer flushes every 0.5 s
    runs = [user_result(user, slots, count) for user in users]
    starts = sum(r["runs"] or 0 for r in runs)
    firsts = [r["first_start"] for r in runs if r["first_start"]]
    lasts = [r["last_end"] for r in runs if r["last_end"]]
    window = (started, ended)
    clients = {user["name"]: read_trace(sorted(user["trace_dir"].glob("client-*.jsonl"))) for user in users}
    tables = route_tables(read_trace([server_trace]), clients, window)
    checks = guarantees(users, slots, shared_files=args.same_repo)
    union = (max(lasts) - min(firsts)) if firsts and lasts else None
    result = {"profile": profile, "users": count, "specs_each": args.specs, "same_repo": args.same_repo,
              "window_s": round(ended - started, 2), "span_all_users_s": round(union, 2) if union else None,
              "spec_starts": starts, "runs": runs, "cpu": cpu, **checks, **tables,
              "server_http_per_spec_started": round(tables["server_totals"]["http_requests"] / starts, 2)
              if starts else None,
              "server_ws_messages_per_spec_started": round(tables["server_totals"]["websocket_messages"] / starts, 2)
              if starts else None}
    for user in users:
        if user["exit_code"] != 0:
            tail = user["log"].read_text(errors="replace")[-1500:] if user["log"].exists() else ""
            result.setdefault("failures", []).append(f"{user['name']} exit {user['exit_code']}: {tail}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=300, help="specs per user")
    parser.add_argument("--users", default="1,2,3", help="user counts, one round each, e.g. 2,3")
    parser.add_argument("--profiles", default="standard,lock-heavy")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-s", type=float, default=1.0, help="shortest spec of the standard profile")
    parser.add_argument("--lock-heavy-min-s", type=float, default=0.5, help="shortest spec of the lock-heavy one")
    parser.add_argument("--max-s", type=float, default=4.0)
    parser.add_argument("--slots", default=DEFAULT_SLOTS)
    parser.add_argument("--same-repo", action="store_true", help="every user's project shares one lock table")
    parser.add_argument("--code", type=Path, default=None, help="run the dispatchers from this checkout")
    parser.add_argument("--timeout", type=float, default=900.0, help="per round, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "team.json")
    args = parser.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    try:
        counts = [int(c) for c in args.users.split(",") if c]
    except ValueError:
        counts = []
    if not profiles or set(profiles) - set(PROFILE_NAMES):
        parser.error(f"--profiles: choose from {', '.join(PROFILE_NAMES)}, got {args.profiles!r}")
    if not counts or min(counts) < 1:
        parser.error(f"--users: user counts of 1 or more separated by commas, e.g. 1,2,3; got {args.users!r}")
    base = Path(tempfile.mkdtemp(prefix="dispatch-team-"))
    server_trace = base / "server-trace.jsonl"
    rounds, broken = [], []
    try:
        with traced_server(base, server_trace) as server, \
                start_cluster(parse_slots(args.slots), base / "cluster") as cluster:
            operator = base / "operator"
            (operator / "home").mkdir(parents=True)
            (operator / "home" / "nodes.json").write_text(cluster.nodes_json.read_text())
            synced = subprocess.run([DISPATCH, "nodes", "sync"], capture_output=True, text=True, timeout=300,
                                    env=user_env(server.url, operator / "home", operator, "operator", operator,
                                                 args.code))
            if synced.returncode != 0:
                print(f"dispatch nodes sync failed:\n{synced.stdout[-2000:]}{synced.stderr[-2000:]}", file=sys.stderr)
                return 1
            for profile in profiles:
                for count in counts:
                    result = run_round(args, profile, count, cluster, server, base, server_trace)
                    rounds.append(result)
                    print_round(result)
                    problems = [f"{node}: {peak} at once" for node, peak in result["slot_overruns"].items()]
                    problems += result["lock_overlaps"] + result.get("failures", [])
                    broken += [f"{profile}, {count} user(s): {p}" for p in problems]
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"specs": args.specs, "slots": args.slots, "seed": args.seed,
                                                    "code": str(args.code or ROOT), "rounds": rounds},
                                                   indent=2, default=str) + "\n")
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(base, ignore_errors=True)
    if broken:
        print("GUARANTEE BROKEN or run failed:\n  " + "\n  ".join(p[:2000] for p in broken), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
