"""A spec's `env:` through the project flow (issue 19, item 2): the node's `env` picks the agent CLI, and a spec
that sets a configured model's variable (known from its AgentModel block) is refused before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.projects import DISPATCH, write_spec

pytestmark = pytest.mark.prefect
FAKE_AGENT = Path(__file__).parent.parent / "fixtures" / "fake_agent.py"


def test_the_nodes_env_path_finds_the_agent_cli(run_project, isolated_home: Path, monkeypatch) -> None:
    fakebin = isolated_home / "node-bin"
    fakebin.mkdir()
    (fakebin / "claude").symlink_to(FAKE_AGENT)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the dispatcher's own PATH has no claude
    nodes = {"nodes": [{"name": "local", "transport": "local", "slots": 1,
                        "env": {"PATH": f"{fakebin}:/usr/bin:/bin"}}]}
    (isolated_home / "home" / "nodes.json").write_text(json.dumps(nodes))
    write_spec(isolated_home / "specs" / "nodepath", "S01-a.md", {"task_id": "S01-a", "model": ["claude"],
                                                                  "retries": 0, "env": {"APP_ENV": "test"}},
               "## Goal\nFAKE: mode=ok\nFAKE: print-env APP_ENV\n")
    state, summary = run_project("nodepath")
    assert state.is_completed(), summary.specs["S01-a"].reason
    log = Path(summary.specs["S01-a"].log_path).read_text()
    assert "APP_ENV=test" in log and "may not set" not in log, log[-2000:]


def test_start_of_a_spec_setting_a_configured_models_variable_exits_2_before_anything_runs(
        prefect_api, isolated_home: Path) -> None:
    from blocks.agent_model import AgentModel

    block = AgentModel(name="bedrock", command=["claude", "-p", "{prompt}"],
                       env={"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "eu-west-1"})
    block.save("bedrock", overwrite=True)
    spec = write_spec(isolated_home / "specs" / "bedrock", "S01-a.md",
                      {"task_id": "S01-a", "model": ["bedrock"], "env": {"AWS_REGION": "us-east-1"}},
                      "## Goal\nFAKE: mode=ok\n")
    try:
        done = subprocess.run([DISPATCH, "start", "bedrock"], capture_output=True, text=True, timeout=240,
                              env=os.environ.copy())
    finally:
        AgentModel.delete("bedrock")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{spec}: env: may not set AWS_REGION" in done.stderr.replace("\n", "")
    assert not (isolated_home / "home" / "runs" / "bedrock").exists(), "nothing of the project ran"


def test_a_run_refused_while_it_sets_up_closes_what_it_opened(run_project, isolated_home: Path, monkeypatch) -> None:
    from blocks.agent_model import AgentModel
    from dispatch.cluster.runtime import ClusterRuntime

    closed: list[str] = []
    real_close = ClusterRuntime.close
    monkeypatch.setattr(ClusterRuntime, "close", lambda self: (closed.append("runtime"), real_close(self)))
    AgentModel(name="bedrock", command=["claude", "-p", "{prompt}"], env={"AWS_REGION": "eu-west-1"}).save(
        "bedrock", overwrite=True)
    write_spec(isolated_home / "specs" / "refused", "S01-a.md",
               {"task_id": "S01-a", "model": ["bedrock"], "env": {"AWS_REGION": "us-east-1"}}, "## Goal\nx\n")
    try:
        state, _ = run_project("refused")
    finally:
        AgentModel.delete("bedrock")
    assert state.is_failed()
    assert closed == ["runtime"], "the nodes' connections opened before the refusal must be closed"
