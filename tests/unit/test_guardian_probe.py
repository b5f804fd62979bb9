"""The guardian's node probe and its run-directory checks on the local node (a real probe process)."""

from __future__ import annotations

import json
import time

import pytest

from dispatch.core.errors import NodeError
from dispatch.core.nodes import Node
from dispatch.core.settings import get_settings
from dispatch.ops.guardian.nodes import Limits, NodeContext, check_node
from dispatch.ops.guardian.probe import MAX_OUTPUT, parse_probe


@pytest.fixture
def embedded(isolated_home, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    return get_settings()


def test_a_probe_answer_that_is_no_json_object_or_too_large_is_refused_naming_the_node():
    with pytest.raises(NodeError, match="n1.*no JSON object.*Traceback"):
        parse_probe("n1", "Traceback (most recent call last):\n  SyntaxError\n")
    with pytest.raises(NodeError, match="n1.*over"):
        parse_probe("n1", "x" * (MAX_OUTPUT + 1))
    assert parse_probe("n1", '{"python": "3.12.1", "runs": "nope"}')["runs"] == []


def _stale_run(root, project: str, task_id: str) -> None:
    run_dir = root / project / "tasks" / task_id
    run_dir.mkdir(parents=True)
    (run_dir / ".runner.lock").touch()
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "project": project, "task_id": task_id,
                                                     "heartbeat_at": time.time() - 600, "heartbeat": 2.0,
                                                     "runner_pid": 999999}))


def test_a_dead_runner_still_marked_running_is_closed_and_hostile_run_names_are_ignored(embedded):
    settings = embedded
    _stale_run(settings.runs_dir, "demo", "t1")
    _stale_run(settings.runs_dir, "-rf", "t2")  # no name we would make: never passed to a command
    ctx = NodeContext(settings, None, Limits(max_load=1e6), live_projects=set())
    checks = {c.name: c for c in check_node(ctx, Node(name="local", slots=2, transport="local"))}
    beats = checks["heartbeats"]
    assert beats.ok is False and "demo/t1" in beats.detail and "-rf" not in beats.detail
    assert beats.status == "REPAIRED", beats.to_json()
    status = json.loads((settings.runs_dir / "demo" / "tasks" / "t1" / "status.json").read_text())
    assert status["state"] == "killed"
    assert json.loads((settings.runs_dir / "-rf" / "tasks" / "t2" / "status.json").read_text())["state"] == "running"
    assert {c.status for c in checks.values()} <= {"ok", "REPAIRED"}


def test_without_knowing_the_live_dispatchers_no_runner_is_touched(embedded):
    settings = embedded
    _stale_run(settings.runs_dir, "demo", "t1")
    ctx = NodeContext(settings, None, Limits(max_load=1e6), live_projects=None)
    checks = {c.name: c for c in check_node(ctx, Node(name="local", slots=2, transport="local"))}
    assert checks["orphans"].status == "NOT RUN"
    assert checks["heartbeats"].status == "FAIL" and checks["heartbeats"].repair is None
    status = json.loads((settings.runs_dir / "demo" / "tasks" / "t1" / "status.json").read_text())
    assert status["state"] == "running"
