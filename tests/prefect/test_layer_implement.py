"""L2 Implement on Prefect's real API: the generated S* specs go through the project flow, for real.

The agents are the fake agent CLI (`claude`), which really writes the files its spec names into the code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.results import Status
from tests.fixtures.projects import shell_spec, write_spec

pytestmark = pytest.mark.prefect


def _layout(isolated_home: Path) -> tuple[Path, Path, Path]:
    specs = isolated_home / "specs" / "shop"
    specs.mkdir(parents=True, exist_ok=True)
    code, run_dir = isolated_home / "code", isolated_home / "home" / "pipeline" / "shop" / "run1"
    code.mkdir(exist_ok=True)
    return specs, code, run_dir


def _agent_spec(directory: Path, name: str, writes: str, **front) -> Path:
    body = (f"## Goal\nWrite {writes}.\n\nFAKE: write {writes} made by {name}\n\n"
            f"## Acceptance criteria\n- [ ] `test -s {writes}`\n")
    return write_spec(directory, f"{name}.md", {"task_id": name, "model": ["claude"], "modifies": [writes], **front},
                      body)


def test_no_generated_spec_is_a_pass_with_nothing_to_implement(prefect_api, isolated_home: Path):
    from flows.layers.implement import implement

    _, code, run_dir = _layout(isolated_home)
    result = implement("shop", str(code), str(run_dir), PipelineConfig())
    assert result.layer == "L2" and result.status is Status.PASS
    assert "nothing to implement" in result.reason


def test_generated_specs_run_through_the_project_flow_apart_from_the_projects_own(fake_agents, isolated_home: Path):
    from prefect.client.orchestration import get_client

    from dispatch.core.results import load_state
    from dispatch.core.settings import get_settings
    from flows.layers.implement import implement

    specs, code, run_dir = _layout(isolated_home)
    timeline = isolated_home / "timeline"
    shell_spec(specs, "S01-own", timeline)  # the project's own spec: `dispatch start shop` runs it, L2 does not
    generated = specs / "generated"
    first = _agent_spec(generated, "S01-models", "app/models.py")
    second = _agent_spec(generated, "S02-api", "app/api.py", depends_on=["S01"])
    _agent_spec(generated, "F01-old-fix", "app/fix.py")  # L5's: not L2's to run

    result = implement("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.PASS, result.reason
    assert (code / "app" / "models.py").read_text() == "made by S01-models\n"
    assert (code / "app" / "api.py").read_text() == "made by S02-api\n"
    assert not (code / "app" / "fix.py").exists()
    assert result.evidence["specs"] == [str(first), str(second)]
    assert [(c.name, c.verdict) for c in result.checks] == [("S01-models", "pass"), ("S02-api", "pass")]

    settings = get_settings()
    state = load_state(settings.state_dir, "shop.pipeline")
    assert {t: row.state for t, row in state.specs.items()} == {"S01-models": "succeeded", "S02-api": "succeeded"}
    assert load_state(settings.state_dir, "shop") is None and not timeline.exists(), "the project's own specs wait"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.flow_run_id).name == "shop.pipeline"
    assert (run_dir / "L2" / "shop.pipeline.json").exists(), "the run's state is kept with the pipeline run"


def test_a_failing_generated_spec_fails_the_layer_and_names_it(fake_agents, isolated_home: Path):
    from flows.layers.implement import implement

    specs, code, run_dir = _layout(isolated_home)
    _agent_spec(specs / "generated", "S01-ok", "ok.txt")
    write_spec(specs / "generated", "S02-broken.md", {"task_id": "S02-broken", "model": ["claude"], "retries": 0},
               "## Goal\nFail.\n\nFAKE: mode=fail\n")
    result = implement("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.FAIL
    assert "S02-broken" in result.reason and "S01-ok" not in result.reason
    assert {c.name: c.verdict for c in result.checks} == {"S01-ok": "pass", "S02-broken": "fail"}


def test_invalid_generated_specs_fail_naming_file_and_field(prefect_api, isolated_home: Path):
    from flows.layers.implement import implement

    specs, code, run_dir = _layout(isolated_home)
    write_spec(specs / "generated", "S01-bad.md", {"task_id": "S01-bad", "depends_on": ["S07"]}, "## Goal\nx\n")
    result = implement("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.FAIL
    assert "S01-bad.md: depends_on" in result.reason


def test_no_agent_cli_is_not_run_with_the_install_command(prefect_api, isolated_home: Path, monkeypatch):
    from flows.layers.implement import implement

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    specs, code, run_dir = _layout(isolated_home)
    _agent_spec(specs / "generated", "S01-a", "a.txt")
    result = implement("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.NOT_RUN
    assert "npm install -g @anthropic-ai/claude-code" in result.reason
    assert not (code / "a.txt").exists()
