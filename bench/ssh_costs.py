"""The fixed cost of the steps a spec attempt makes on a node, over one reused paramiko connection.

    .venv/bin/python bench/ssh_costs.py [--repeat 20]

Starts a one-node loopback cluster and times, per command (median / p95 over --repeat runs): a bare
round trip (`true`), a python3 start-up (`python3 -c pass`), the node runner's `status` of a missing
run directory (what `_attach` runs before every start), and a fresh connection (what the baseline's
one-SSHClient-per-task pays). Writes bench/out/ssh_costs.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import paramiko

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import start_cluster  # noqa: E402
from measures import summary, write_result  # noqa: E402

from dispatch.cluster.ssh import SSHPool  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "ssh_costs.json")
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory(prefix="dispatch-sshcost-") as tmp, start_cluster([4], Path(tmp)) as cluster:
        target = cluster.target("loop1")
        pool = SSHPool()
        pool.run(target, "true", timeout=30)
        commands = {"round_trip_true": "true", "python3_startup": "python3 -c pass",
                    "python3_import_json_subprocess": "python3 -c 'import json, subprocess, argparse'"}
        for name, command in commands.items():
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                pool.run(target, command, timeout=30)
                times.append(time.perf_counter() - t)
            result[name] = summary(times)
        node = cluster.node("loop1")
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            client = paramiko.SSHClient()
            client.load_host_keys(node["known_hosts"])
            client.connect(node["host"], port=node["port"], username=node["user"], key_filename=node["key_path"],
                           look_for_keys=False, allow_agent=False, timeout=10)
            _, out, _ = client.exec_command("true")
            out.channel.recv_exit_status()
            client.close()
            times.append(time.perf_counter() - t)
        result["new_connection_plus_true"] = summary(times)
        pool.close()
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
