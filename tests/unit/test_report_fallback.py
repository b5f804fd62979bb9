"""What status and the report say of a spec's models (which were passed over, and why) and of its cost."""

from __future__ import annotations

import time

from dispatch.core.report import model_text, render_markdown, total_money, usage_line
from dispatch.core.results import Attempt, ProjectState, SpecResult, SpecRow


def _result(*attempts: Attempt, status: str = "succeeded", skipped: list[str] | None = None) -> SpecResult:
    return SpecResult(project="p", task_id="S01", status=status, attempts=list(attempts), skipped_models=skipped or [])


def test_the_models_passed_over_are_named_with_why_and_the_one_that_did_the_work() -> None:
    reset = time.mktime((2026, 12, 7, 14, 5, 0, 0, 0, -1))
    result = _result(Attempt(model="glm", verdict="quota", reason="GLM 1308: 5-hour cap", reset_at=reset),
                     Attempt(model="minimax", verdict="failure", reason="no CLI 'claude' on PATH for model minimax"),
                     Attempt(model="codex", verdict="transient", reason="API Error: Connection refused"),
                     Attempt(model="claude", verdict="ok"), skipped=["opencode"])

    assert result.fallback() == ("opencode: on cool-down; glm: quota until 14:05; minimax: CLI missing; "
                                 "codex: connection refused -> claude")
    row = SpecRow(state="succeeded", model="claude", fallback=result.fallback())
    assert model_text(row).startswith("claude (after opencode: on cool-down; glm: quota until 14:05")


def test_a_first_model_that_did_the_work_alone_shows_no_fallback() -> None:
    assert _result(Attempt(model="claude", verdict="ok")).fallback() == ""
    assert model_text(SpecRow(state="succeeded", model="claude")) == "claude"


def test_a_chain_that_failed_says_why_its_last_model_failed_too() -> None:
    result = _result(Attempt(model="glm", verdict="billing", reason="GLM 1113"),
                     Attempt(model="claude", verdict="auth", reason="Invalid API key"), status="failed")

    assert result.fallback() == ("glm: billing (blocked until `dispatch models reset`) -> claude "
                                 "(auth: Invalid API key)")


def test_unknown_cost_is_a_dash_and_the_total_agrees_with_the_rows_shown() -> None:
    state = ProjectState(project="p", run_id="r", started_at=time.time(), specs={
        "S01": SpecRow(state="succeeded", model="codex", attempts=1, attempts_without_cost=1),
        "S02": SpecRow(state="succeeded", model="codex", attempts=1, attempts_without_cost=1)})
    assert usage_line(state).startswith("- reported")

    state.specs["S01"].cost_usd = state.specs["S02"].cost_usd = 0.00014  # each row shows $0.0001
    assert total_money([0.00014, 0.00014, None]) == 0.0002
    report = render_markdown(state)
    assert "- usage: $0.0002 reported" in report and report.count("| $0.0001 |") == 2
