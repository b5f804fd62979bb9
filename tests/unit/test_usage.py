"""Usage and cost per attempt: parsed from what each agent CLI prints (recorded real shapes in
tests/fixtures/agent_output/), carried in result.json and SpecResult, kept in the ledger, totalled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.core.results import SpecResult
from dispatch.runner.events import UsageMeter
from tests.fixtures.runner import RUNNER_PATH

SHAPES = Path(__file__).resolve().parents[1] / "fixtures" / "agent_output"
FAKE_AGENT = Path(__file__).resolve().parents[1] / "fixtures" / "fake_agent.py"
CLAUDE = ["claude", "-p", "--output-format", "stream-json", "--verbose"]


def _meter(name: str) -> dict | None:
    meter = UsageMeter()
    for line in (SHAPES / name).read_text(encoding="utf-8").splitlines():
        meter.add(json.loads(line))
    return meter.usage()


def test_claude_result_event_gives_cost_and_tokens_once() -> None:
    usage = _meter("claude_stream_json.jsonl")
    # the final result's session totals; the assistant events' per-message usage is not added on top
    assert usage == {"source": "claude", "cost_usd": pytest.approx(0.34641974999999997), "input_tokens": 8,
                     "output_tokens": 32, "cache_read_tokens": 17004, "cache_write_tokens": 192,
                     "agent_model": "claude-sonnet-4-5-20250929"}


def test_codex_turn_completed_gives_tokens_and_no_cost() -> None:
    usage = _meter("codex_exec_json.jsonl")
    assert usage == {"source": "codex", "input_tokens": 70021, "cache_read_tokens": 57088, "output_tokens": 2374,
                     "reasoning_tokens": 1152}
    assert "cost_usd" not in usage, "Codex prints no cost: unknown, not 0"


def test_opencode_step_finish_events_are_summed() -> None:
    usage = _meter("opencode_run_json.jsonl")
    assert usage == {"source": "opencode", "cost_usd": pytest.approx(0.0070147 + 0.0012336),
                     "input_tokens": 11087 + 11350, "output_tokens": 145 + 38, "reasoning_tokens": 12,
                     "cache_read_tokens": 10944, "cache_write_tokens": 0}


def test_no_usage_event_means_unknown_and_bad_numbers_are_ignored() -> None:
    meter = UsageMeter()
    meter.add({"type": "assistant", "message": {"content": "hi"}})
    assert meter.usage() is None
    meter.add({"type": "result", "total_cost_usd": "lots", "usage": {"input_tokens": -3, "output_tokens": True}})
    assert meter.usage() is None, "no number it can trust: nothing recorded"


def _run(tmp_path: Path, steps: list[dict]) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("claude", "codex", "opencode"):
        (bin_dir / name).symlink_to(FAKE_AGENT)
    run_dir = tmp_path / "tasks" / "S01"
    run_dir.mkdir(parents=True)
    task = {"project": "demo", "task_id": "S01", "workdir": str(tmp_path / "work"), "timeout": 60,
            "stall_timeout": 30, "heartbeat": 0.5, "steps": steps, "node_env": {"PATH": f"{bin_dir}:/usr/bin:/bin"}}
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    subprocess.run([sys.executable, "-S", str(RUNNER_PATH), "run", str(run_dir)], capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL)
    return json.loads((run_dir / "result.json").read_text())


def test_runner_records_each_attempts_usage_as_the_agent_printed_it(tmp_path: Path) -> None:
    prompt = ("FAKE: model=glm mode=claude-api-rate-limit-json\nFAKE: model=codex mode=codex-usage-json cost=0.5\n"
              "FAKE: model=claude mode=ok cost=0.04 tokens=1200,300\n")
    steps = [{"name": "glm", "argv": CLAUDE, "stdin": prompt, "env": {"FAKE_AGENT_MODEL": "glm"}},
             {"name": "codex", "argv": ["codex", "exec", "--json", "--full-auto", "-"], "stdin": prompt,
              "env": {"FAKE_AGENT_MODEL": "codex"}},
             {"name": "claude", "argv": CLAUDE, "stdin": prompt, "env": {"FAKE_AGENT_MODEL": "claude"}}]
    result = _run(tmp_path, steps)
    glm, codex, claude = result["attempts"]
    assert result["status"] == "succeeded", result["reason"]
    assert glm.get("usage") is None, "the rate-limited result printed no usage: unknown"
    assert codex.get("usage") is None, "codex printed turn.failed, no turn.completed: unknown"
    assert claude["usage"]["cost_usd"] == pytest.approx(0.04)
    assert (claude["usage"]["input_tokens"], claude["usage"]["output_tokens"]) == (1200, 300)
    spec = SpecResult.from_runner(result, project="demo", task_id="S01")
    assert spec.attempts[2].usage is not None and spec.attempts[2].usage.cost_usd == pytest.approx(0.04)
    assert spec.attempts[0].usage is None
    assert spec.usage().cost_usd == pytest.approx(0.04)


def test_codex_and_opencode_json_usage_reach_the_result_and_plain_opencode_has_none(tmp_path: Path) -> None:
    prompt = "FAKE: mode=ok tokens=500,70\n"
    steps = [{"name": "codex", "argv": ["codex", "exec", "--json", "--full-auto", "-"], "stdin": prompt}]
    codex = _run(tmp_path / "a", steps)["attempts"][0]["usage"]
    assert codex == {"source": "codex", "input_tokens": 500, "cache_read_tokens": 0, "output_tokens": 70}
    steps = [{"name": "opencode", "argv": ["opencode", "run", "--format", "json"],
              "stdin": "FAKE: mode=ok cost=0.02\n"}]
    opencode = _run(tmp_path / "b", steps)["attempts"][0]["usage"]
    assert opencode["source"] == "opencode" and opencode["cost_usd"] == pytest.approx(0.02)
    plain = _run(tmp_path / "c", [{"name": "opencode", "argv": ["opencode", "run"], "stdin": prompt}])
    assert plain["status"] == "succeeded" and plain["attempts"][0].get("usage") is None


def _result(task_id: str, *attempts: tuple[str, float | None], project: str = "demo") -> SpecResult:
    return SpecResult.model_validate({
        "project": project, "task_id": task_id, "status": "succeeded", "node": "local",
        "attempts": [{"model": model, "verdict": "ok", "exit_code": 0, "ended_at": 1_767_225_600.0 + n,  # 2026-01-01
                      "usage": None if cost is None else {"source": "claude", "cost_usd": cost,
                                                          "input_tokens": 100, "output_tokens": 10}}
                     for n, (model, cost) in enumerate(attempts)]})


def test_ledger_totals_per_model_user_project_and_day(isolated_home: Path) -> None:
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_records, totals

    settings = get_settings()
    records = (ledger_records(_result("S01", ("glm", 0.01), ("claude", 0.04)), user="alice", run_id="r1")
               + ledger_records(_result("S02", ("codex", None), project="shop"), user="bob", run_id="r2"))
    never_ran = _result("S03", ("opencode", None))  # its CLI was missing: no exit code, nothing reported
    never_ran.attempts[0].exit_code = None
    assert ledger_records(never_ran, user="bob", run_id="r2") == [], "an agent that never ran spent nothing"
    append_ledger(settings.results_dir, records, settings.usage_ledger_bytes)
    found = totals(settings, since=0)
    assert (found["attempts"], found["attempts_without_cost"]) == (3, 1)
    assert found["cost_usd"] == pytest.approx(0.05) and found["input_tokens"] == 200
    assert found["by_model"]["claude"]["cost_usd"] == pytest.approx(0.04)
    assert found["by_model"]["codex"] == {**found["by_model"]["codex"], "cost_usd": 0.0, "attempts_without_cost": 1}
    assert found["by_user"]["alice"]["cost_usd"] == pytest.approx(0.05) and found["by_user"]["bob"]["attempts"] == 1
    assert set(found["by_project"]) == {"demo", "shop"} and set(found["by_day"]) == {"2026-01-01"}
    assert totals(settings)["attempts"] == 0, "the default window is today (UTC)"


def test_ledger_rotates_past_its_size_and_totals_read_both(isolated_home: Path) -> None:
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_path, ledger_records, totals

    settings = get_settings()
    record = ledger_records(_result("S01", ("claude", 0.01)), user="alice", run_id="r1")
    for _ in range(3):
        append_ledger(settings.results_dir, record * 200, max_bytes=1 << 16)
    path = ledger_path(settings.results_dir)
    assert path.with_name("usage.jsonl.1").exists() and path.stat().st_size <= 1 << 16
    kept = totals(settings, since=0)["attempts"]
    assert 200 <= kept < 600, "the oldest rotation is dropped, the last two files are read"


def test_budget_over_for_one_model_falls_to_the_next_and_over_for_all_waits(isolated_home: Path, monkeypatch) -> None:
    from dispatch.core.budgets import Budgets
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_records

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # this machine's ledger alone (team: tests/prefect)
    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 0.05, "glm": 1}')
    monkeypatch.setenv("DISPATCH_BUDGET_USER", '{"bob": 0.02}')
    get_settings.cache_clear()
    settings = get_settings()
    clock = lambda: 1_767_225_600.0 + 3600  # noqa: E731 - the same UTC day as the ledger's records
    budgets = Budgets(settings, clock=clock)
    assert budgets.check(["claude", "glm"], "alice", []) == (["claude", "glm"], "")
    records = ledger_records(_result("S01", ("claude", 0.04)), user="alice", run_id="r1")
    append_ledger(settings.results_dir, records, settings.usage_ledger_bytes)
    budgets.refresh()
    # spent 0.04 + an estimated 0.04 for the next spec passes 0.05: claude is left out, glm runs
    assert budgets.check(["claude", "glm"], "alice", []) == (["glm"], "")
    chain, why = budgets.check(["claude"], "alice", [])
    assert chain == [] and why.startswith("budget reached: claude $0.04 of $0.05 today (UTC)")
    bob = ledger_records(_result("S02", ("glm", 0.02)), user="bob", run_id="r2")
    append_ledger(settings.results_dir, bob, settings.usage_ledger_bytes)
    budgets.refresh()
    chain, why = budgets.check(["glm"], "bob", [])
    assert chain == [] and "user bob $0.02 of $0.02" in why
    assert Budgets(settings, clock=lambda: clock() + 86400).check(["claude"], "alice", []) == (["claude"], ""), \
        "the next UTC day starts from zero"


def test_usage_command_shows_totals_and_budgets_and_refuses_a_bad_day(isolated_home: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from dispatch.cli.main import app
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_records

    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 20}')
    get_settings.cache_clear()
    settings = get_settings()
    records = ledger_records(_result("S01", ("claude", 0.04), ("codex", None)), user="alice", run_id="r1")
    append_ledger(settings.results_dir, records, settings.usage_ledger_bytes)
    shown = CliRunner().invoke(app, ["usage", "--since", "2026-01-01", "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["by_model"]["claude"]["cost_usd"] == pytest.approx(0.04) and data["attempts_without_cost"] == 1
    assert data["budgets"]["model"]["claude"] == {"limit_usd": 20.0, "spent_usd": 0.0}, "spent today, not in 2026-01"
    text = CliRunner().invoke(app, ["usage", "--since", "2026-01-01"]).output
    assert "$0.0400 reported over 2 attempt(s)" in text and "1 attempt(s) reported no cost" in text, text
    bad = CliRunner().invoke(app, ["usage", "--since", "yesterday"])
    assert bad.exit_code == 2 and "--since 'yesterday'" in bad.output and "YYYY-MM-DD" in bad.output


def test_budgets_read_only_new_ledger_lines_and_follow_a_rotation(isolated_home: Path, monkeypatch) -> None:
    from dispatch.core.budgets import Budgets
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_records

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("DISPATCH_BUDGET_USER", '{"alice": 100}')
    get_settings.cache_clear()
    settings = get_settings()
    budgets = Budgets(settings, clock=lambda: 1_767_225_600.0 + 60)
    one = ledger_records(_result("S01", ("claude", 0.01)), user="alice", run_id="r1")
    for count in (150, 150, 50):  # ~250 bytes a line: the second append passes 64 KiB and rotates, the third not
        append_ledger(settings.results_dir, one * count, max_bytes=1 << 16)
        budgets.refresh()
    assert budgets._spent_on("user", "alice", "2026-01-01") == pytest.approx(0.01 * 350), \
        "every line counted once, in usage.jsonl.1 and usage.jsonl"
    assert settings.results_dir.joinpath("usage.jsonl.1").exists()


class _CountingBoard:
    """A team spend board that keeps what was published."""

    errors = (OSError,)

    def __init__(self) -> None:
        self.published: list[dict] = []

    def publish(self, day: str, spent: dict) -> None:
        self.published.append(dict(spent))

    def prune(self, today: str) -> list[str]:
        return []

    def read(self, day: str) -> dict:
        return {}


def test_team_spend_is_published_when_it_changed_not_after_every_result(isolated_home: Path, monkeypatch) -> None:
    from dispatch.core import budgets as budgets_module
    from dispatch.core.budgets import Budgets
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_records

    monkeypatch.setattr(budgets_module, "_TEAM_PUBLISH", 0.0)
    get_settings.cache_clear()
    settings = get_settings()
    board = _CountingBoard()
    budgets = Budgets(settings, clock=lambda: 1_767_225_600.0 + 60, team=board)
    for _ in range(3):  # results with nothing spent (shell specs): nothing to tell the other machines
        budgets.refresh()
        budgets.close()
    assert board.published == []
    append_ledger(settings.results_dir, ledger_records(_result("S01", ("claude", 0.01)), user="alice", run_id="r1"),
                  settings.usage_ledger_bytes)
    budgets.refresh()
    budgets.refresh()
    budgets.close()
    assert len(board.published) == 1 and board.published[0][("model", "claude", "2026-01-01")] == \
        pytest.approx(0.01)


def test_usage_is_read_by_the_runner_under_the_oldest_python_a_node_may_have(tmp_path: Path) -> None:
    from tests.unit.test_node_runner import _oldest_python

    python = _oldest_python() or sys.executable  # 3.8 when this machine has one, as the shipped-copy tests
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").symlink_to(FAKE_AGENT)
    run_dir = tmp_path / "tasks" / "S01"
    run_dir.mkdir(parents=True)
    task = {"project": "demo", "task_id": "S01", "workdir": str(tmp_path / "work"), "timeout": 60,
            "steps": [{"name": "claude", "argv": CLAUDE, "stdin": "FAKE: mode=ok cost=0.04\n"}],
            "node_env": {"PATH": f"{bin_dir}:/usr/bin:/bin"}}
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    done = subprocess.run([python, "-S", str(RUNNER_PATH), "run", str(run_dir)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "succeeded", (result["reason"], done.stderr[-2000:])
    assert result["attempts"][0]["usage"]["cost_usd"] == pytest.approx(0.04)
