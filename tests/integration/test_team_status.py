"""Team mode's shared view, on real processes: two users' `dispatch start` against one Prefect server on
PostgreSQL, seen with their users and states by `dispatch status` from a third home; `dispatch start --detach`
refused with a clear message while the deployment is missing, then submitted to a real `prefect worker`.

As in test_team_mode.py, every subprocess gets its PREFECT_API_URL, PREFECT_HOME and auth from
`TeamServer.env()` (the session's SQLite test server owns the ambient PREFECT_API_URL).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dispatch.core.results import load_state
from tests.fixtures.projects import read_timeline, shell_spec
from tests.integration.test_team_mode import _run, _worker_env, deploy_from_repo, gateway_worker

if TYPE_CHECKING:
    from tests.fixtures.postgres import TeamServer

pytestmark = pytest.mark.integration

_DISPATCH = [sys.executable, "-m", "dispatch.cli.main"]
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _user_env(server: TeamServer, root: Path, user: str, **extra: str) -> dict[str, str]:
    """A member's environment: their own DISPATCH_HOME under `root/<user>`, and their login name."""
    home = root / user / "home"
    home.mkdir(parents=True, exist_ok=True)
    return server.env(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(root / "specs"),
                      DISPATCH_PROJECTS=str(root / user / "projects"), DISPATCH_LOCAL_SLOTS="2",
                      USER=user, LOGNAME=user, COLUMNS="250", **extra)


def _team_runs(env: dict[str, str]) -> tuple[dict[str, dict], float]:
    """`dispatch status --json`'s team runs by project, and how long the command took."""
    began = time.monotonic()
    status = _run([*_DISPATCH, "status", "--json"], env, timeout=60)
    took = time.monotonic() - began
    assert status.returncode == 0, status.stdout + status.stderr
    data = json.loads(status.stdout)
    assert data["team_runs"] is not None, status.stderr
    return {run["project"]: run for run in data["team_runs"]}, took


def test_status_lists_every_users_running_projects(team_server: TeamServer, tmp_path: Path) -> None:
    timelines = {}
    for user in ("alice", "bob"):
        timelines[user] = tmp_path / f"{user}.timeline"
        shell_spec(tmp_path / "specs" / f"{user}-proj", f"S01-{user}", timelines[user], seconds=12)
    envs = {user: _user_env(team_server, tmp_path, user) for user in ("alice", "bob")}
    logs = {user: tmp_path / f"{user}.log" for user in envs}
    runs = {}
    for user, env in envs.items():
        with open(logs[user], "wb") as log:
            runs[user] = subprocess.Popen([*_DISPATCH, "start", f"{user}-proj"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
    carol = _user_env(team_server, tmp_path, "carol")
    try:
        deadline = time.monotonic() + 120
        while not all(f"S01-{user}" in read_timeline(timelines[user]) for user in envs):
            assert time.monotonic() < deadline, "\n".join(logs[u].read_text() for u in envs)
            assert all(run.poll() is None for run in runs.values()), "\n".join(logs[u].read_text() for u in envs)
            time.sleep(0.2)

        listed, took = _team_runs(carol)
        print(f"\n[team-status] dispatch status --json with 2 team runs: {took:.2f} s")
        for user in envs:
            run = listed.get(f"{user}-proj")
            assert run is not None, listed
            assert (run["user"], run["host"], run["state"]) == (user, socket.gethostname(), "RUNNING"), run
            local = load_state(Path(envs[user]["DISPATCH_HOME"]) / "state", f"{user}-proj")
            assert local is not None and run["flow_run_id"] == local.flow_run_id
            assert local.user == user, "the flow's started_by names the user in the state file too"
            assert run["url"] == f"{team_server.url.removesuffix('/api')}/runs/flow-run/{run['flow_run_id']}"
            assert run["deployment"] is None and run["elapsed"] > 0
            assert run["tasks"] == {"RUNNING": 1}, run
        assert not json.loads(_run([*_DISPATCH, "status", "--json"], carol).stdout)["projects"], \
            "carol's own machine ran nothing"

        for user, run in runs.items():
            assert run.wait(timeout=120) == 0, logs[user].read_text()
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
    listed, _ = _team_runs(carol)
    assert not {"alice-proj", "bob-proj"} & set(listed), f"finished runs listed as running: {listed}"


def test_detach_names_a_missing_deployment_and_submits_nothing(team_server: TeamServer, tmp_path: Path) -> None:
    shell_spec(tmp_path / "specs" / "lonely", "S01-lonely", tmp_path / "timeline", seconds=0.1)
    env = _user_env(team_server, tmp_path, "dave", DISPATCH_DEPLOYMENT="dispatch-project/no-such-deployment")
    result = _run([*_DISPATCH, "start", "lonely", "--detach"], env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'dispatch-project/no-such-deployment'" in result.stderr and team_server.url in result.stderr
    assert "prefect deploy --all" in result.stderr and "Traceback" not in result.stderr
    listed, _ = _team_runs(env)
    assert "lonely" not in listed

    shell_spec(tmp_path / "specs" / "broken", "S01-broken", tmp_path / "timeline", depends_on=["S99"])
    invalid = _run([*_DISPATCH, "start", "broken", "--detach"], env, timeout=60)
    assert invalid.returncode == 2 and "S01-broken.md: depends_on: names 'S99'" in invalid.stderr, invalid.stderr


def test_status_with_wrong_credentials_warns_once_and_shows_this_machine(team_server: TeamServer,
                                                                         tmp_path: Path) -> None:
    env = _user_env(team_server, tmp_path, "erin", PREFECT_API_AUTH_STRING="team:wrong")
    result = _run([*_DISPATCH, "status"], env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "401" in result.stderr and team_server.url in result.stderr
    assert "team:wrong" not in result.stdout + result.stderr and "local" in result.stdout


def test_detach_submits_the_run_to_a_worker(team_server: TeamServer, tmp_path: Path) -> None:
    env = team_server.env()
    deploy_from_repo(env)

    timeline = tmp_path / "timeline"
    shell_spec(tmp_path / "specs" / "remote", "S01-first", timeline, seconds=0.2)
    shell_spec(tmp_path / "specs" / "remote", "S02-slow", timeline, seconds=8, depends_on=["S01"])
    worker_home = tmp_path / "worker-home"
    worker_env = _worker_env(team_server, worker_home)
    worker_env.update(DISPATCH_SPECS=str(tmp_path / "specs"), DISPATCH_PROJECTS=str(tmp_path / "worker-projects"))
    log_path = tmp_path / "worker.log"
    with gateway_worker(worker_env, log_path, tmp_path):
        alice = _user_env(team_server, tmp_path, "alice")
        began = time.monotonic()
        submitted = _run([*_DISPATCH, "start", "remote", "--detach"], alice, timeout=60)
        took = time.monotonic() - began
        print(f"\n[team-status] dispatch start --detach returned in {took:.2f} s")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        early = load_state(worker_home / "state", "remote")
        assert early is None or early.state == "running", "--detach must return before the run ends"
        flow_run_id = _UUID.search(submitted.stdout).group(0)
        assert "dispatch status" in submitted.stdout and f"/runs/flow-run/{flow_run_id}" in submitted.stdout

        listed, _ = _team_runs(alice)
        run = listed.get("remote")
        assert run is not None and run["flow_run_id"] == flow_run_id, listed
        assert run["user"] == "alice" and run["deployment"] == "dispatch-project/dispatch-project", run
        assert run["state"] in ("SCHEDULED", "PENDING", "RUNNING"), run

        deadline = time.monotonic() + 240
        while True:
            state = load_state(worker_home / "state", "remote")
            if state is not None and state.flow_run_id == flow_run_id and state.state != "running":
                break
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        # the flow run's final state reaches the server just after the state file: keep the worker until then
        deadline = time.monotonic() + 60
        while "remote" in (listed := _team_runs(alice)[0]):
            assert time.monotonic() < deadline, listed
            time.sleep(0.5)
    assert state.state == "completed", (state, log_path.read_text(errors="replace")[-4000:])
    assert state.user == "alice", "the started_by parameter names the submitter on the worker"
    assert set(read_timeline(timeline)) == {"S01-first", "S02-slow"}
