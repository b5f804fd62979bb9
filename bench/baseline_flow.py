"""The plain-Prefect BASELINE: the flow a user would write with plain Prefect 3 for the same project.

    PREFECT_API_URL=http://127.0.0.1:<port>/api .venv/bin/python bench/baseline_flow.py \
        --specs-dir <dir> --nodes nodes.json [--workers 140]

One @task per spec, submitted in dependency order with `wait_for=` its dependencies' futures; node slots
and file locks are Prefect global concurrency limits (`baseline-node-<name>` with the node's slots,
`baseline-lock-<path>` with limit 1) taken in one `prefect.concurrency.sync.concurrency([...], occupy=1)`
call; the node is chosen by weighted round-robin (each node appears `slots` times in the cycle); the
spec's bash block runs over paramiko with one SSHClient per task (what a naive user writes). The limits
are created (or reset) first.
Needs a Prefect server (global concurrency limits); not for the embedded SQLite API alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import paramiko
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.task_runners import ThreadPoolTaskRunner


def limit_name(kind: str, value: str) -> str:
    # "baseline-" keeps these apart from ours' team-mode limits `node-<name>` (ours would take them up)
    return f"baseline-{kind}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", value)


def read_specs(specs_dir: Path) -> list[dict]:
    specs = []
    for path in sorted(specs_dir.glob("S*.md")):
        text = path.read_text()
        _, front, body = text.split("---\n", 2)
        meta = yaml.safe_load(front)
        script = body.split("```bash\n", 1)[1].split("```", 1)[0]
        specs.append({**meta, "script": script})
    return specs


@task(retries=2, retry_delay_seconds=1)
def run_spec(spec: dict, node: dict) -> int:
    names = [limit_name("node", node["name"])] + [limit_name("lock", m) for m in spec.get("modifies") or []]
    with concurrency(names, occupy=1):
        client = paramiko.SSHClient()
        client.load_host_keys(node["known_hosts"])
        client.connect(node["host"], port=node["port"], username=node["user"], key_filename=node["key_path"],
                       look_for_keys=False, allow_agent=False, timeout=10)
        try:
            command = (f"cd {node['remote_root']} && DISPATCH_TASK_ID={spec['task_id']} "
                       f"DISPATCH_NODE={node['name']} bash -s")
            stdin, stdout, stderr = client.exec_command(command)
            stdin.write(spec["script"])
            stdin.channel.shutdown_write()
            code = stdout.channel.recv_exit_status()
        finally:
            client.close()
    if code != 0:
        raise RuntimeError(f"{spec['task_id']} exited {code}: {stderr.read().decode()[-500:]}")
    return code


def ensure_limits(nodes: list[dict], specs: list[dict]) -> None:
    wanted = {limit_name("node", n["name"]): n["slots"] for n in nodes}
    for spec in specs:
        for path in spec.get("modifies") or []:
            wanted[limit_name("lock", path)] = 1
    with get_client(sync_client=True) as client:
        for name, limit in wanted.items():
            try:
                client.delete_global_concurrency_limit_by_name(name)
            except Exception:  # noqa: BLE001 - absent is fine
                pass
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def build_flow(workers: int):
    @flow(name="baseline-project", task_runner=ThreadPoolTaskRunner(max_workers=workers), log_prints=False)
    def baseline_project(specs: list[dict], nodes: list[dict]) -> dict:
        cycle = [n for n in nodes for _ in range(n["slots"])]
        futures = {}
        for index, spec in enumerate(specs):  # files are in topological order (S<index>)
            node = cycle[index % len(cycle)]
            deps = [futures[d] for d in spec.get("depends_on") or []]
            futures[spec["task_id"]] = run_spec.with_options(task_run_name=spec["task_id"]).submit(
                spec, node, wait_for=deps)
        for future in futures.values():
            future.wait()
        states = {t: f.state.type.value for t, f in futures.items()}
        return {"completed": sum(s == "COMPLETED" for s in states.values()), "total": len(states)}

    return baseline_project


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs-dir", type=Path, required=True)
    parser.add_argument("--nodes", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=0, help="task runner threads (default: total slots)")
    args = parser.parse_args()
    nodes = json.loads(args.nodes.read_text())["nodes"]
    specs = read_specs(args.specs_dir)
    ensure_limits(nodes, specs)
    started = time.time()
    baseline_project = build_flow(args.workers or sum(n["slots"] for n in nodes))
    result = baseline_project(specs, nodes)
    print(json.dumps({**result, "flow_s": round(time.time() - started, 2)}))
    return 0 if result["completed"] == result["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
