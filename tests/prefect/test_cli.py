"""The `dispatch` command as users run it: real subprocesses, exit codes, --json, stop and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dispatch.core.net import free_port
from tests.fixtures.projects import DISPATCH, read_timeline, shell_spec, start_in_background, write_spec

pytestmark = pytest.mark.prefect


def dispatch(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCH, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else os.environ.copy())


def wait_for(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_validate_reports_every_error_with_file_and_field_and_exit_2(isolated_home: Path):
    specs = isolated_home / "specs" / "bad"
    write_spec(specs, "S01-a.md", {"task_id": "S01-a", "priority": "high"}, "## Goal\nx\n")
    write_spec(specs, "S02-b.md", {"task_id": "S02-b", "depends_on": ["S09"]}, "## Goal\nx\n")
    write_spec(specs, "S03-c.md", {"task_id": "S03-c", "depends_on": ["S04"]}, "## Goal\nx\n")
    write_spec(specs, "S04-d.md", {"task_id": "S04-d", "depends_on": ["S03"]}, "## Goal\nx\n")
    (specs / "S05-e.md").write_text("---\ntask_id: [unclosed\n---\nbody\n")
    result = dispatch("validate", "bad")
    assert result.returncode == 2
    out = result.stderr
    assert "S01-a.md: priority: must be 1 (high), 2 (default) or 3 (low), got 'high'" in out
    assert "S02-b.md: depends_on: names 'S09' but no spec has that id" in out
    assert "dependency cycle: S03-c -> S04-d -> S03-c" in out or "dependency cycle: S04-d -> S03-c -> S04-d" in out
    assert "S05-e.md: front matter: bad YAML" in out

    as_json = dispatch("validate", "bad", "--json")
    assert as_json.returncode == 2
    fields = {(Path(e["file"]).name, e["field"]) for e in json.loads(as_json.stdout)["errors"]}
    assert {("S01-a.md", "priority"), ("S02-b.md", "depends_on"), ("S05-e.md", "front matter")} <= fields


def test_start_of_an_invalid_project_schedules_nothing(prefect_api, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "halfbad", isolated_home / "timeline"
    shell_spec(specs, "S01-good", timeline)
    shell_spec(specs, "S02-bad", timeline, depends_on=["S77"])
    result = dispatch("start", "halfbad")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "S02-bad.md: depends_on: names 'S77'" in result.stderr
    assert not timeline.exists(), "no spec of an invalid project may run"
    assert not (isolated_home / "home" / "state" / "halfbad.json").exists()


def test_start_status_report_collect_cleanup(prefect_api, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "cli", isolated_home / "timeline"
    shell_spec(specs, "S01-make", timeline, extra="mkdir -p out && echo built > out/artifact.txt",
               modifies=["out/"])
    shell_spec(specs, "S02-fail", timeline, extra="echo 'something broke' >&2; exit 4", retries=0)
    shell_spec(specs, "S03-after", timeline, depends_on=["S02"])
    result = dispatch("start", "cli")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1/3 succeeded, 1 failed, 1 not run" in result.stdout

    status = dispatch("status", "cli", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    specs_state = data["projects"][0]["specs"]
    assert specs_state["S01-make"]["state"] == "succeeded"
    assert specs_state["S02-fail"]["state"] == "failed" and specs_state["S02-fail"]["exit_code"] == 4
    assert specs_state["S03-after"]["state"] == "not_run"
    assert data["nodes"]["local"]["used"] == 0

    report = dispatch("report", "cli")
    assert report.returncode == 0
    assert "| S02-fail | failed |" in report.stdout
    assert "something broke" in report.stdout, "a failure's log tail belongs in the report"
    assert "succeeded 1 (33%)" in report.stdout

    collected = dispatch("collect", "cli")
    assert collected.returncode == 0, collected.stderr
    results = isolated_home / "home" / "results" / "cli"
    assert (results / "S01-make" / "files" / "out" / "artifact.txt").read_text() == "built\n"
    assert "something broke" in (results / "S02-fail" / "task.log").read_text()

    cleaned = dispatch("cleanup", "cli")
    assert cleaned.returncode == 0
    assert not (isolated_home / "home" / "runs" / "cli").exists()
    assert (isolated_home / "home" / "state" / "cli.json").exists(), "cleanup keeps reports unless --all"


def test_killed_dispatcher_restarts_without_rerunning_finished_specs(prefect_api, isolated_home: Path,
                                                                     monkeypatch):
    monkeypatch.setenv("DISPATCH_LOCAL_SLOTS", "2")
    specs, timeline = isolated_home / "specs" / "crash", isolated_home / "timeline"
    shell_spec(specs, "S01-quick", timeline, seconds=0.2)
    shell_spec(specs, "S02-quick", timeline, seconds=0.2)
    shell_spec(specs, "S03-long", timeline, seconds=6, depends_on=["S01", "S02"])
    shell_spec(specs, "S04-last", timeline, seconds=0.2, depends_on=["S03"])
    first = start_in_background("crash", isolated_home / "first.log")
    wait_for(lambda: "S03-long" in read_timeline(timeline), 120, "S03-long to start")
    os.kill(first.pid, signal.SIGKILL)  # the dispatcher dies; the runner of S03 lives on
    first.wait()

    second = dispatch("start", "crash")
    assert second.returncode == 0, second.stdout + second.stderr
    runs = read_timeline(timeline)
    assert {k: len(v) for k, v in runs.items()} == {"S01-quick": 1, "S02-quick": 1, "S03-long": 1, "S04-last": 1}
    assert all(end is not None for v in runs.values() for _, end in v)
    assert runs["S04-last"][0][0] >= runs["S03-long"][0][1]


def test_stop_from_another_terminal_kills_running_specs(prefect_api, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "stoppable", isolated_home / "timeline"
    marker = f"{time.time():.6f}".split(".")[1]
    shell_spec(specs, "S01-sleepy", timeline, seconds=f"4{marker}")
    shell_spec(specs, "S02-after", timeline, depends_on=["S01"])
    run = start_in_background("stoppable", isolated_home / "run.log")
    wait_for(lambda: "S01-sleepy" in read_timeline(timeline), 120, "S01 to start")
    stopped = dispatch("stop", "stoppable")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert run.wait(timeout=60) == 1, (isolated_home / "run.log").read_text()
    assert subprocess.run(["pgrep", "-f", f"sleep 4{marker}"], capture_output=True).returncode == 1, \
        "the stopped spec's process is still alive"
    state = json.loads(dispatch("status", "stoppable", "--json").stdout)["projects"][0]
    assert state["state"] == "cancelled"
    assert state["specs"]["S01-sleepy"]["state"] == "cancelled"
    assert state["specs"]["S02-after"]["state"] == "cancelled"
    assert "S02-after" not in read_timeline(timeline)


@pytest.mark.integration
def test_demo_runs_on_the_embedded_default_with_zero_setup(isolated_home: Path, monkeypatch):
    """The README's first command: no server, no keys, no configuration; then a cached second run."""
    home = isolated_home / "fresh" / "dispatch-home"  # not there yet, as on a fresh machine
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("DISPATCH_SPECS", "DISPATCH_PROJECTS")}
    env["DISPATCH_HOME"] = str(home)
    env["DISPATCH_SERVER_PORT"] = str(free_port())  # the default 4200 may be a server of the user's
    try:
        first = dispatch("start", "demo", env=env, timeout=400)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "demo completed: 7/7 succeeded" in first.stdout
        assert "flow run in the Prefect UI: http://127.0.0.1:" in first.stdout
        assert "dispatch server stop" in first.stderr, "the user is told the local server stays and how to stop it"
        assert (home / "prefect").is_dir(), "embedded Prefect keeps its database under DISPATCH_HOME"
        workspace = home / "workspaces" / "demo"
        assert (workspace / "build" / "demo.tar.gz").stat().st_size > 0
        second = dispatch("start", "demo", env=env, timeout=400)
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.count("(cached)") == 7
    finally:
        stopped = dispatch("server", "stop", env=env)
    assert stopped.returncode == 0 and "stopped the local Prefect server" in stopped.stdout, stopped.stdout
