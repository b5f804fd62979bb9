"""Split ours' per-spec latency into Prefect's share and the node's share, from the Prefect API.

    PREFECT_API_URL=... .venv/bin/python bench/prefect_phases.py <DISPATCH_HOME>/state/<project>.json <timeline>

For each spec: dispatched (the flow submitted the task run) -> Prefect task run Running (start_time: the
task engine's own API round trips and thread start) -> the spec's shell starts on the node (timeline: SSH
commands, node runner start-up) ... the shell ends (timeline) -> task run end_time (the follow stream
noticing the runner's exit, result.json read back) -> the flow notices it (state ended_at).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measures import read_runs, summary  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402


def main() -> int:
    state = json.loads(Path(sys.argv[1]).read_text())
    runs = read_runs(Path(sys.argv[2]))
    with get_client(sync_client=True) as client:
        task_runs, offset = [], 0
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(state["flow_run_id"])]))
        while True:
            page = client.read_task_runs(flow_run_filter=flow_filter, limit=200, offset=offset)
            task_runs += page
            offset += len(page)
            if len(page) < 200:
                break
    by_name = {}
    for tr in task_runs:
        if tr.start_time:
            by_name.setdefault(tr.name.split(" ")[0], tr)
    to_running, running_to_start, end_to_task_end, task_end_to_noticed = [], [], [], []
    for task_id, row in state["specs"].items():
        tr, r = by_name.get(task_id), runs.get(task_id)
        if not tr or not r or not row.get("dispatched_at"):
            continue
        start, end = r[-1][0], r[-1][1]
        ts = tr.start_time.timestamp()
        to_running.append(ts - row["dispatched_at"])
        running_to_start.append(start - ts)
        if tr.end_time and end:
            end_to_task_end.append(tr.end_time.timestamp() - end)
            if row.get("ended_at"):
                task_end_to_noticed.append(row["ended_at"] - tr.end_time.timestamp())
    print(json.dumps({"dispatched_to_task_running_s": summary(to_running),
                      "task_running_to_spec_start_s": summary(running_to_start),
                      "spec_end_to_task_end_s": summary(end_to_task_end),
                      "task_end_to_flow_noticed_s": summary(task_end_to_noticed)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
