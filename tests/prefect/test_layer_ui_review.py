"""L4c UI Review on Prefect's real API, with the fake agent CLI as every review model: PASS, FAIL (a page under
the minimum, overflow counted), NOT RUN (no CLI, every model limited, no valid answer), and a next model
asked when the first answers no valid review."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.results import PageCapture, Status

pytestmark = pytest.mark.prefect


def _page(run_dir: Path, path: str, directive: str, **fields) -> PageCapture:
    name = path.strip("/") or "home"
    (run_dir / "L4b").mkdir(parents=True, exist_ok=True)
    (run_dir / "L4b" / f"{name}.html").write_text(f"<html><body><h1>{name}</h1>\n{directive}\n</body></html>\n")
    (run_dir / "L4b" / f"{name}-1920x1080.png").write_bytes(b"\x89PNG\r\n")
    return PageCapture(path=path, url=f"http://127.0.0.1:8000{path}", html_file=f"L4b/{name}.html",
                       screenshots={"1920x1080": f"L4b/{name}-1920x1080.png"}, **fields)


@pytest.fixture
def run_dir(isolated_home: Path) -> Path:
    return isolated_home / "home" / "pipeline" / "shop" / "run1"


def test_every_page_at_or_above_the_minimum_passes(fake_agents, run_dir: Path):
    from flows.layers.ui_review import ui_review

    pages = [_page(run_dir, "/", "FAKE: ui-review=22,20,19,24"), _page(run_dir, "/cart", "FAKE: ui-review=18,18,18,18")]
    result = ui_review("shop", str(run_dir), PipelineConfig(), pages)
    assert result.layer == "L4c" and result.status is Status.PASS, result.reason
    assert result.evidence["scores"]["/"]["total"] == 85 and result.evidence["lowest"] == 72
    assert [(c.name, c.verdict) for c in result.checks] == [("/", "pass"), ("/cart", "pass")]
    assert (run_dir / "L4c" / "scores.json").exists()


def test_a_page_under_the_minimum_fails_as_a_bug_and_overflow_counts(fake_agents, run_dir: Path):
    from flows.layers.ui_review import ui_review

    pages = [_page(run_dir, "/", "FAKE: ui-review=22,20,19,24"),
             _page(run_dir, "/cart", "FAKE: ui-review=19,20,20,20", overflow=True)]
    result = ui_review("shop", str(run_dir), PipelineConfig(), pages)
    assert result.status is Status.FAIL
    assert result.evidence["scores"]["/cart"]["total"] == 69, "79 minus the overflow penalty of 10"
    (bug,) = result.bugs
    assert (bug.layer, bug.where, bug.severity) == ("L4c", "/cart", "S3")
    assert "overflow" in bug.evidence and "/cart 69" in result.reason


def test_no_review_cli_is_not_run_with_the_install_command(prefect_api, run_dir: Path, monkeypatch):
    from flows.layers.ui_review import ui_review

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    result = ui_review("shop", str(run_dir), PipelineConfig(), [_page(run_dir, "/", "")])
    assert result.status is Status.NOT_RUN
    assert "no review model can run" in result.reason and "npm install -g @anthropic-ai/claude-code" in result.reason


def test_every_model_limited_is_not_run_and_cools_the_model_down(fake_agents, run_dir: Path):
    from prefect.variables import Variable

    from flows.layers.ui_review import ui_review

    page = _page(run_dir, "/", "FAKE: mode=claude-usage-epoch\nFAKE: ui-review=22,20,19,24")
    result = ui_review("shop", str(run_dir), PipelineConfig(), [page])
    assert result.status is Status.NOT_RUN and result.reason.startswith("every review model is limited")
    assert Variable.get("dispatch_cooldown_claude")["kind"] == "quota"
    again = ui_review("shop", str(run_dir), PipelineConfig(), [page])
    assert again.status is Status.NOT_RUN and "claude: cooling down until" in again.reason


def test_an_invalid_answer_goes_to_the_next_model(fake_agents, run_dir: Path):
    from flows.layers.ui_review import ui_review

    config = PipelineConfig.model_validate({"models": {"review": ["claude", "codex"]}})
    page = _page(run_dir, "/", "FAKE: model=claude ui-review=30,0,0,0\nFAKE: model=codex ui-review=20,20,20,20")
    result = ui_review("shop", str(run_dir), config, [page])
    assert result.status is Status.PASS, result.reason
    assert result.evidence["scores"]["/"]["model"] == "codex"

    only_claude = PipelineConfig.model_validate({"models": {"review": ["claude"]}})
    result = ui_review("shop", str(run_dir), only_claude, [page])
    assert result.status is Status.NOT_RUN
    assert "no review model gave a valid review" in result.reason and "from 0 to 25" in result.reason


def test_no_capture_is_not_run(prefect_api, run_dir: Path):
    from flows.layers.ui_review import ui_review

    result = ui_review("shop", str(run_dir), PipelineConfig(), [])
    assert result.status is Status.NOT_RUN and "L4b" in result.reason


def test_a_transient_limit_in_a_layers_question_cools_the_model_for_the_team(prefect_api, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    from dispatch.pipeline.agent_call import _record_limits
    from dispatch.prefect.cooldowns import server_cooldowns

    keeper = server_cooldowns(refresh=0)
    try:
        _record_limits([{"model": "minimax", "verdict": "transient", "reason": "429 rate limit", "retry_after": 45}])
        cooling = keeper.load().get("minimax")
        assert cooling is not None and cooling["kind"] == "transient", cooling
    finally:
        keeper.clear("minimax")
