"""Where the machine's CPU goes during a run: sample every process's CPU time from /proc, grouped by kind.

    .venv/bin/python bench/cpu_sampler.py --seconds 120 [--interval 0.5] > out.json

Kinds: node runner `run` (supervises the spec), node runner `follow` (streams the log back), other node
runner commands, sshd, the dispatcher (`dispatch start`), the baseline flow, the Prefect server, bash/sleep
(the specs themselves), other sessions (pytest, other Prefect servers, node runners outside --dir: this
machine is shared), other. CPU of a process that lives less than one interval is missed (approximate).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")


OURS = {"dir": "", "port": ""}


def kind(cmd: str) -> str:
    runner = "runner.pyz" in cmd or "node_runner.py" in cmd
    if OURS["dir"] and runner and OURS["dir"] not in cmd:
        return "other sessions"
    if OURS["port"] and "server" in cmd and "prefect" in cmd and f"--port {OURS['port']}" not in cmd:
        return "other sessions"
    if "pytest" in cmd:
        return "other sessions"
    if runner:
        for sub in (" run ", " follow ", " status "):
            if sub in cmd:
                return "node_runner" + sub.strip()
        return "node_runner other"
    if "sshd" in cmd:
        return "sshd"
    if "dispatch start" in cmd or "bin/dispatch" in cmd:
        return "dispatcher"
    if "baseline_flow.py" in cmd:
        return "baseline flow"
    if "prefect server" in cmd or "prefect" in cmd and "server" in cmd or "uvicorn" in cmd:
        return "prefect server"
    if cmd.startswith(("bash", "sleep", "/bin/bash", "sh ", "date")):
        return "spec shell"
    return "other"


def snapshot() -> dict[int, tuple[str, float]]:
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry.name}/stat").read()
            cmd = open(f"/proc/{entry.name}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        found[int(entry.name)] = (kind(cmd.strip()), (int(fields[11]) + int(fields[12])) / TICK)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--dir", default="", help="our cluster's directory (node runners elsewhere are others')")
    parser.add_argument("--port", default="", help="our Prefect server's port (other servers are others')")
    args = parser.parse_args()
    OURS.update(dir=args.dir, port=args.port)
    seen: dict[int, tuple[str, float]] = snapshot()  # processes already running count from now on
    cpu: dict[str, float] = defaultdict(float)
    procs: dict[str, set[int]] = defaultdict(set)
    end = time.monotonic() + args.seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        for pid, (k, used) in snapshot().items():
            before = seen.get(pid, (k, 0.0))[1] if pid in seen else 0.0
            cpu[k] += max(0.0, used - before)
            seen[pid] = (k, used)
            procs[k].add(pid)
        time.sleep(args.interval)
    elapsed = time.monotonic() - t0
    print(json.dumps({"seconds": round(elapsed, 1), "cores": os.cpu_count(),
                      "cpu_s_by_kind": {k: round(v, 1) for k, v in sorted(cpu.items(), key=lambda x: -x[1])},
                      "processes_by_kind": {k: len(v) for k, v in procs.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
