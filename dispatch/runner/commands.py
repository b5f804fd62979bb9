"""The runner's commands on a run directory it does not run: status, kill, tail, live (`run` is in
`start.py`, `serve` in `serve.py`).

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from . import protocol
from .procs import KILL_GRACE, POLL, orphan_step, pid_alive, terminate_group
from .rundir import CHUNK, read_json, write_json
from .zipapp import runner_version


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def cmd_status(run_dir: str) -> int:
    status = read_json(os.path.join(run_dir, protocol.STATUS_FILE)) or {"state": "absent"}
    pid_alive = protocol.runner_alive(run_dir)  # the runner's process lives: it holds the run directory's lock
    beat = status.get("heartbeat_at")
    interval = status.get("heartbeat") or 2.0
    age = time.time() - beat if isinstance(beat, (int, float)) else None
    alive = pid_alive and age is not None and age <= 3 * interval
    out = dict(status)
    out.update(
        run_dir=run_dir,
        alive=alive,
        pid_alive=pid_alive,
        heartbeat_age=age,
        stale=status.get("state") == "running" and not alive,
    )
    if status.get("state") in protocol.FINAL_STATES or not alive:
        result = read_json(os.path.join(run_dir, protocol.RESULT_FILE))
        if result is not None:
            out["result"] = result
    print_json(out)
    return 0


def cmd_kill(run_dir: str) -> int:
    print_json(kill_run(run_dir))
    return 0


def kill_run(run_dir: str) -> dict[str, Any]:
    """Stop the run in `run_dir` and wait until it has gone (SIGTERM, a grace, SIGKILL; then an orphaned step's
    process group); a runner that died without finishing gets a `killed` result. Returns what was done."""
    status_path = os.path.join(run_dir, protocol.STATUS_FILE)
    status = read_json(status_path) or {}
    pid = protocol.lock_holder(run_dir) or status.get("runner_pid")
    report: dict[str, Any] = {"run_dir": run_dir, "runner_pid": pid, "was_running": False}
    if pid_alive(pid):
        report["was_running"] = True
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + KILL_GRACE + 12
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(POLL)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    orphan = orphan_step(run_dir)
    if orphan is not None:
        report["was_running"] = True
        report["orphans_left"] = not terminate_group(orphan)
    status = read_json(status_path) or {}
    if status.get("state") == "running":  # the runner died without finishing: close the books
        now = time.time()
        status.update(state="killed", step_pid=None, ended_at=now)
        write_json(status_path, status)
        if not os.path.exists(os.path.join(run_dir, protocol.RESULT_FILE)):
            write_json(
                os.path.join(run_dir, protocol.RESULT_FILE),
                protocol.result_record(
                    project=status.get("project"),
                    task_id=status.get("task_id"),
                    status="killed",
                    reason="killed; the runner had died, so this result was written by `kill`",
                    model=status.get("step"),
                    started_at=status.get("started_at"),
                    ended_at=now,
                    duration=None,
                    runner_version=runner_version(),
                ),
                sync=True,
            )
    report["state"] = status.get("state", "absent")
    return report


def cmd_tail(run_dir: str, from_byte: int) -> int:
    try:
        handle = open(os.path.join(run_dir, "task.log"), "rb")
    except OSError:
        return 0
    with handle:
        if from_byte < 0:
            handle.seek(0, os.SEEK_END)
            from_byte = max(0, handle.tell() + from_byte)
        handle.seek(from_byte)
        while True:
            data = handle.read(CHUNK)
            if not data:
                break
            sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_live(tasks_dir: str, finished: bool = False) -> int:
    """Print `live_runs(tasks_dir, finished)` as one JSON line."""
    print(json.dumps(live_runs(tasks_dir, finished)))
    return 0


def live_runs(tasks_dir: str, finished: bool = False) -> list[list[Any]]:
    """[[task_id, cache_key, "running"], ...] for the run directories under `tasks_dir` whose runner is alive;
    with `finished`, also [task_id, cache_key, "succeeded"] for those whose runner ended in success."""
    found: list[list[Any]] = []
    names = sorted(os.listdir(tasks_dir)) if os.path.isdir(tasks_dir) else []
    for name in names:
        run_dir = os.path.join(tasks_dir, name)
        if not os.path.exists(os.path.join(run_dir, protocol.LOCK_FILE)):
            continue
        if protocol.runner_alive(run_dir):
            state = "running"
        elif finished and (read_json(os.path.join(run_dir, protocol.RESULT_FILE)) or {}).get("status") == "succeeded":
            state = "succeeded"
        else:
            continue
        found.append([name, (read_json(os.path.join(run_dir, protocol.TASK_FILE)) or {}).get("cache_key"), state])
    return found
