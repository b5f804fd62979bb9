"""Snapshot and restore on the embedded default, as a user meets it: the demo run on this home's local Prefect
server (SQLite under DISPATCH_HOME), snapshotted while that server runs, its runs and state deleted, restored,
and read back from the restored server: the same flow run, task runs and states, the same `dispatch status`.

Real `dispatch` processes with no PREFECT_* in their environment; the module's own port, never 4200.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from dispatch.core.net import free_port
from tests.fixtures.projects import DISPATCH

pytestmark = [pytest.mark.prefect, pytest.mark.integration]


class _Home:
    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DISPATCH_"))}
        self.env |= {"DISPATCH_HOME": str(self.home), "DISPATCH_SERVER_PORT": str(free_port()), "COLUMNS": "250",
                     "DISPATCH_LOCAL_SLOTS": "3"}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([DISPATCH, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"dispatch {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def api(self) -> str:
        return json.loads((self.home / "local-server.json").read_text())["port"]

    def flow_run(self, flow_run_id: str) -> tuple[int, dict, list[tuple]]:
        """(HTTP status, the flow run, its task runs as (id, name, state)) from the local server."""
        base = f"http://127.0.0.1:{self.api()}/api"
        run = httpx.get(f"{base}/flow_runs/{flow_run_id}", timeout=10)
        tasks = httpx.post(f"{base}/task_runs/filter", timeout=10,
                           json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
        return run.status_code, run.json(), sorted((t["id"], t["name"], t["state_type"]) for t in tasks)


@pytest.fixture
def local_home(tmp_path: Path):
    home = _Home(tmp_path)
    yield home
    home.run("server", "stop", timeout=120)
    mark = f"DISPATCH_LOCAL_SERVER={home.home}\0".encode()
    for entry in os.scandir("/proc"):  # a server the test left behind when it failed early
        try:
            if entry.name.isdigit() and mark in Path(f"/proc/{entry.name}/environ").read_bytes():
                os.killpg(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def test_embedded_snapshot_delete_restore_reads_back_the_same_runs_and_status(local_home: _Home,
                                                                              tmp_path: Path) -> None:
    local_home.ok("start", "demo")
    status = json.loads(local_home.ok("status", "demo", "--json"))["projects"][0]
    flow_run_id = status["flow_run_id"]
    code, run, tasks = local_home.flow_run(flow_run_id)
    assert code == 200 and run["state_type"] == "COMPLETED" and len(tasks) == 7

    shot = json.loads(local_home.ok("snapshot", "--dest", str(tmp_path / "snaps"), "--json"))  # the server runs

    # delete: the run in Prefect's database (through its server) and the home's state, results, runs and cache
    base = f"http://127.0.0.1:{local_home.api()}/api"
    assert httpx.delete(f"{base}/flow_runs/{flow_run_id}", timeout=10).status_code == 204
    for area in ("state", "results", "runs", "cache"):
        shutil.rmtree(local_home.home / area)
    assert local_home.flow_run(flow_run_id)[0] == 404
    gone = local_home.run("status", "demo", "--json")
    assert gone.returncode != 0 or not json.loads(gone.stdout)["projects"], gone.stdout

    restored = local_home.run("restore", shot["archive"])
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "stopped the local Prefect server" in restored.stdout  # it was up: restore stopped it itself

    local_home.ok("ui")  # the next command starts the server again, on the restored database
    code, run_back, tasks_back = local_home.flow_run(flow_run_id)
    assert code == 200
    assert (run_back["name"], run_back["state_type"]) == (run["name"], "COMPLETED")
    assert tasks_back == tasks
    assert json.loads(local_home.ok("status", "demo", "--json"))["projects"][0] == status
