"""Usage figures are an agent's own output, so untrusted: a cost or token count that is not finite, negative or
past its bound ($10,000, 10^10 tokens per attempt) is recorded as unknown with a warning, by the runner and
again by the dispatcher (a node may run an older runner), and never reaches a total, a budget or `--json`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatch.core.results import SpecResult
from dispatch.runner.events import USAGE_MAX_COST_USD, USAGE_MAX_TOKENS, UsageMeter
from tests.fixtures.runner import RUNNER_PATH

_FORGED = {"type": "result", "subtype": "success", "is_error": False, "result": "done", "num_turns": 1,
           "total_cost_usd": 1e308, "usage": {"input_tokens": 1e308, "output_tokens": 12}}


def _strict(text: str) -> dict:
    """JSON as a strict parser reads it: `Infinity` and `NaN` are no JSON."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("figures, kept", [
    ({"total_cost_usd": 1e308, "usage": {"input_tokens": 1e308, "output_tokens": 12}}, {"output_tokens": 12}),
    ({"total_cost_usd": USAGE_MAX_COST_USD + 1, "usage": {"input_tokens": USAGE_MAX_TOKENS + 1}}, {}),
    ({"total_cost_usd": -0.5, "usage": {"input_tokens": 12.5, "output_tokens": 3}}, {"output_tokens": 3}),
    ({"total_cost_usd": 0.25, "usage": {"input_tokens": 10**400}}, {"cost_usd": 0.25}),
])
def test_the_runner_records_a_figure_past_its_bound_as_unknown_with_a_warning(figures, kept) -> None:
    meter = UsageMeter()
    warnings = meter.add({"type": "result", **figures})
    assert {k: v for k, v in (meter.usage() or {}).items() if k != "source"} == kept
    assert warnings and all("WARNING" in w and "recorded as unknown" in w for w in warnings)


def test_one_forged_step_makes_an_opencode_sum_unknown_not_smaller() -> None:
    meter = UsageMeter()
    step = {"type": "step_finish", "part": {"cost": 0.01, "tokens": {"input": 10, "output": 5}}}
    meter.add(step)
    assert meter.add({"type": "step_finish", "part": {"cost": float("nan"), "tokens": {"input": 10}}})
    meter.add(step)
    assert meter.usage() == {"source": "opencode", "input_tokens": 30, "output_tokens": 10}


def test_a_forged_result_event_leaves_the_task_whole_and_says_so_in_task_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "tasks" / "S01"
    run_dir.mkdir(parents=True)
    agent = f"import json; print(json.dumps({_FORGED!r}))"
    task = {"project": "demo", "task_id": "S01", "workdir": str(tmp_path / "work"), "timeout": 60,
            "steps": [{"name": "claude", "argv": [sys.executable, "-c", agent]}]}
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    done = subprocess.run([sys.executable, "-S", str(RUNNER_PATH), "run", str(run_dir)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    data = _strict((run_dir / "result.json").read_text())
    assert data["status"] == "succeeded", (data["reason"], done.stderr[-2000:])
    assert data["attempts"][0]["usage"] == {"source": "claude", "output_tokens": 12}
    log = (run_dir / "task.log").read_text()
    assert "claude reported cost_usd 1e+308 is not a finite number from 0 to 10,000; recorded as unknown" in log
    assert "input_tokens 1e+308" in log and "$1" not in log.split("agent result")[-1].splitlines()[0]
    result = SpecResult.from_runner(data, project="demo", task_id="S01")
    assert result.usage().cost_usd is None and result.usage().output_tokens == 12


def test_the_dispatcher_checks_the_figures_of_an_older_runner_too(caplog) -> None:
    older = {"project": "demo", "task_id": "S01", "status": "succeeded", "attempts": [
        {"model": "claude", "verdict": "ok", "exit_code": 0,
         "usage": {"source": "claude", "cost_usd": 1e308, "input_tokens": 1e308, "output_tokens": 7}}]}
    with caplog.at_level(logging.WARNING, logger="dispatch.core.usage"):
        result = SpecResult.from_runner(older, project="demo", task_id="S01")  # was: int_parsing_size
    usage = result.attempts[0].usage
    assert (usage.cost_usd, usage.input_tokens, usage.output_tokens) == (None, None, 7)
    assert "cost_usd 1e+308 is not a finite number" in caplog.text and "recorded as unknown" in caplog.text


def test_sums_of_checked_figures_are_not_bound_like_one_attempt() -> None:
    from dispatch.core.results import Attempt, SpecRow
    from dispatch.core.usage import Usage

    big = Usage(cost_usd=USAGE_MAX_COST_USD, input_tokens=USAGE_MAX_TOKENS)
    assert big.plus(big).cost_usd == 2 * USAGE_MAX_COST_USD and big.plus(big).input_tokens == 2 * USAGE_MAX_TOKENS
    row = SpecRow(state="succeeded")
    row.add_usage([Attempt(model="claude", verdict="ok", exit_code=0, usage=big)] * 2)
    assert row.cost_usd == 2 * USAGE_MAX_COST_USD and row.attempts_without_cost == 0
    older = SpecRow.model_validate({"state": "failed", "cost_usd": float("inf"), "input_tokens": 1e308})
    assert (older.cost_usd, older.input_tokens) == (None, None), "an older state file's sums: unknown, no crash"


def _forged_ledger(settings, day_ts: float) -> None:
    """Ledger lines an older dispatcher wrote from forged events: 1e308 twice (their sum is inf)."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    line = {"ts": day_ts, "day": time.strftime("%Y-%m-%d", time.gmtime(day_ts)), "project": "demo",
            "task_id": "S01", "run_id": "r1", "attempt": "1.1", "user": "alice", "node": "local", "model": "claude",
            "role": "agent", "verdict": "ok", "source": "claude", "cost_usd": 1e308, "input_tokens": 1e308}
    honest = {**line, "cost_usd": 0.04, "input_tokens": 100}
    (settings.results_dir / "usage.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in (line, line, honest)), encoding="utf-8")


def test_usage_json_is_strict_json_and_a_forged_cost_is_unknown(isolated_home: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from dispatch.cli.main import app
    from dispatch.core.settings import get_settings

    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 20}')
    get_settings.cache_clear()
    _forged_ledger(get_settings(), time.time())
    shown = CliRunner().invoke(app, ["usage", "--json"])
    assert shown.exit_code == 0, shown.output
    data = _strict(shown.output)  # was: "cost_usd": Infinity
    assert data["cost_usd"] == pytest.approx(0.04) and data["attempts_without_cost"] == 2
    assert data["input_tokens"] == 100 and data["budgets"]["model"]["claude"]["spent_usd"] == pytest.approx(0.04)
    text = CliRunner().invoke(app, ["usage"]).output
    assert "$0.0400 reported over 3 attempt(s)" in text and "inf" not in text, text


def test_a_forged_cost_does_not_spend_a_models_budget(isolated_home: Path, monkeypatch) -> None:
    from dispatch.core.budgets import Budgets
    from dispatch.core.settings import get_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 20}')
    get_settings.cache_clear()
    now = time.time()
    _forged_ledger(get_settings(), now)
    assert Budgets(get_settings(), clock=lambda: now).check(["claude"], "alice", []) == (["claude"], "")


class _Published:
    """A team's spend board that holds what other machines published (hostile input) and takes nothing."""

    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, published: dict) -> None:
        self.published = published

    def publish(self, day: str, spent: dict) -> None:
        pass

    def prune(self, today: str) -> list[str]:
        return []

    def read(self, day: str) -> dict:
        return self.published


def test_a_forged_spend_published_by_other_machines_does_not_block_a_budget(isolated_home: Path, monkeypatch):
    from dispatch.core.budgets import Budgets
    from dispatch.core.settings import get_settings

    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 20}')
    get_settings.cache_clear()
    forged = {"model": {"claude": 1e308}, "user": {"alice": 1e308}}
    budgets = Budgets(get_settings(), team=_Published({"m1": forged, "m2": forged}))
    assert budgets.check(["claude"], "alice", []) == (["claude"], "")


def test_spend_of_other_machines_that_is_no_map_is_skipped_not_a_crash(isolated_home: Path, monkeypatch):
    from dispatch.core.budgets import Budgets
    from dispatch.core.settings import get_settings

    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 20}')
    get_settings.cache_clear()
    published = {"m1": {"model": ["claude", 30], "user": "alice"}, "m2": "junk", "m3": {"model": {"claude": 25}}}
    allowed, why = Budgets(get_settings(), team=_Published(published)).check(["claude"], "alice", [])
    assert allowed == [] and "claude" in why, "m3's well-formed spend still counts"


def test_monitor_json_is_strict_json_with_an_older_state_files_infinite_cost(isolated_home: Path, monkeypatch):
    from typer.testing import CliRunner

    from dispatch.cli.main import app
    from dispatch.core.results import state_path
    from dispatch.core.settings import get_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    get_settings.cache_clear()
    settings = get_settings()
    _forged_ledger(settings, time.time())
    path = state_path(settings.state_dir, "alpha")
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"state": "failed", "node": "local", "model": "claude", "ended_at": time.time(), "reason": "x",
           "cost_usd": float("inf")}
    path.write_text(json.dumps({"project": "alpha", "state": "done", "pid": os.getpid(), "specs": {"S01": row}}))
    shown = CliRunner().invoke(app, ["monitor", "--once", "--json"])
    assert shown.exit_code == 0, shown.output
    data = _strict(shown.output)  # was: Infinity, from the state file and from today's ledger
    assert data["failures"][0]["cost_usd"] is None and data["projects"][0]["cost_usd"] is None
    assert data["usage_today"]["cost_usd"] == pytest.approx(0.04)
