"""Guardian cycle time on a loopback cluster (7 real sshd nodes by default).

    .venv/bin/python bench/guardian.py [--slots 8,8,8,8,20,40,48] [--cycles 5] [--out bench/results/guardian.json]

Starts the nodes (rigs/loopback_cluster.py), writes their nodes.json into a fresh DISPATCH_HOME and runs
`dispatch.ops.guardian.run_cycle` in embedded mode (no server checks: set PREFECT_API_URL to include them) the
given number of times. The first cycle ships the runner to every node (a repair); the rest are the steady
state a scheduled guardian sees. Prints the first cycle's time and the steady cycles' median and max, and
the `dispatch guardian --once` wall time (a fresh process: imports and SSH connections included). Only
loopback addresses are used.
"""

from __future__ import annotations

import argparse
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

from cluster import DEFAULT_SLOTS, parse_slots  # noqa: E402
from measures import write_result  # noqa: E402

from rigs.loopback_cluster import LoopbackCluster  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", default=DEFAULT_SLOTS, help="slots per node, comma-separated (one node each)")
    parser.add_argument("--cycles", type=int, default=5, help="cycles to run in this process")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "guardian.json")
    args = parser.parse_args()
    slots = parse_slots(args.slots)
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp, LoopbackCluster() as cluster:
        base = Path(tmp)
        cluster.start(slots, base / "cluster", port=0)
        home = base / "home"
        home.mkdir()
        (home / "nodes.json").write_text(cluster.nodes_json.read_text())
        os.environ["DISPATCH_HOME"] = str(home)
        # every loopback node is this machine: its load (other jobs on a shared box) is not what is measured
        os.environ.setdefault("DISPATCH_GUARDIAN_MAX_LOAD", "1000")
        from dispatch.core.settings import get_settings
        from dispatch.ops.guardian import run_cycle

        get_settings.cache_clear()
        settings = get_settings()
        times, problems = [], []
        for _ in range(args.cycles):
            started = time.monotonic()
            report = run_cycle(settings)
            times.append(time.monotonic() - started)
            problems.append([f"{c.target} {c.name} {c.status}" for c in report.problems])
        started = time.monotonic()
        done = subprocess.run([str(Path(sys.executable).with_name("dispatch")), "guardian", "--once", "--json"],
                              capture_output=True, text=True, env=os.environ.copy())
        cli = time.monotonic() - started
    steady = times[1:] or times
    result = {"nodes": len(slots), "checks_per_cycle": len(report.checks), "first_cycle_s": round(times[0], 3),
              "steady_median_s": round(statistics.median(steady), 3), "steady_max_s": round(max(steady), 3),
              "cli_once_s": round(cli, 3), "cli_exit_code": done.returncode,
              "mode": "team" if settings.prefect_api_url else "embedded", "problems_last_cycle": problems[-1]}
    write_result(args.out, result)
    return 0 if not problems[-1] and done.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
