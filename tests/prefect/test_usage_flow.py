"""Usage and budgets through the project flow, on Prefect's real API, with the fake agent reporting costs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixtures.projects import write_spec

pytestmark = pytest.mark.prefect


@pytest.fixture(autouse=True)
def no_team_spend(prefect_api: str):
    """No machine's published spend (every team-mode run publishes its own) before or after a test: the session's
    server is shared, and budgets count what every other machine spent today."""
    from prefect.variables import Variable

    from dispatch.core.usage import utc_day
    from dispatch.prefect.spend import team_spend

    def clear() -> None:
        day = utc_day(time.time())
        for machine in team_spend(day):
            Variable.unset(f"dispatch_usage_{day.replace('-', '')}_{machine}")

    clear()
    yield
    clear()


def _agent_runs(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_budget_reached_holds_the_second_spec_back_before_it_spends(run_project, fake_agents, isolated_home: Path,
                                                                    monkeypatch) -> None:
    from dispatch.cli.main import app
    from dispatch.core.results import load_state
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import totals
    from dispatch.core.watch import Watch, watching

    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 0.05}')
    env = {"FAKE_AGENT_LOG": str(isolated_home / "agents.jsonl")}  # every agent run, logged by the fake agent
    specs = isolated_home / "specs" / "budget"
    costs = "FAKE: mode=ok cost=0.04 tokens=1000,200\n"
    write_spec(specs, "S01-first.md", {"task_id": "S01-first", "model": ["claude"], "env": env},
               f"## Goal\nWrite.\n\n{costs}")
    write_spec(specs, "S02-second.md", {"task_id": "S02-second", "depends_on": ["S01-first"], "model": ["claude"],
                                        "env": env}, f"## Goal\nWrite more.\n\n{costs}")
    seen: dict = {}

    def listener(event: str, task_id: str, details: dict) -> None:
        if event != "waiting" or "state" in seen:
            return
        seen["reason"] = details.get("reason", "")
        seen["state"] = load_state(get_settings().state_dir, "budget")
        seen["status"] = json.loads(CliRunner().invoke(app, ["status", "budget", "--json"]).output)
        stop = signal.getsignal(signal.SIGTERM)  # the flow's own handler: what `dispatch stop` triggers
        if callable(stop) and "_install_signal_handlers" in getattr(stop, "__qualname__", ""):
            stop(signal.SIGTERM, None)

    with watching(Watch(on_event=listener)):
        state, summary = run_project("budget", slots=2)
    assert "state" in seen, f"S02 was never held back: {summary.specs if summary else None}"
    row = seen["state"].specs["S02-second"]
    assert row.reason.startswith("budget reached: claude $0.04 of $0.05 today (UTC)"), row.reason
    assert row.state not in ("running", "succeeded")
    shown = seen["status"]["projects"][0]["specs"]["S02-second"]  # what `dispatch status` says of it
    assert shown["reason"] == row.reason and shown["state"] == row.state
    first = seen["state"].specs["S01-first"]
    assert first.state == "succeeded" and first.cost_usd == pytest.approx(0.04)
    assert (first.input_tokens, first.output_tokens) == (1000, 200)
    assert [r["prompt"].count("Write more") for r in _agent_runs(isolated_home / "agents.jsonl")] == [0], \
        "the second spec never ran an agent"
    assert summary.specs["S02-second"].state == "cancelled" and state.is_cancelled()
    assert totals(get_settings())["by_model"]["claude"]["cost_usd"] == pytest.approx(0.04)


def test_a_model_over_budget_falls_to_the_next_model_and_usage_reaches_report_and_status(
        run_project, fake_agents, isolated_home: Path, monkeypatch) -> None:
    from dispatch.cli.main import app
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import totals

    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 0.05}')
    specs = isolated_home / "specs" / "fallback"
    body = "## Goal\nWrite.\n\nFAKE: model=claude mode=ok cost=0.04\nFAKE: model=codex mode=ok tokens=700,90\n"
    write_spec(specs, "S01-a.md", {"task_id": "S01-a", "model": ["claude", "codex"]}, body)
    write_spec(specs, "S02-b.md", {"task_id": "S02-b", "depends_on": ["S01-a"], "model": ["claude", "codex"]}, body)
    state, summary = run_project("fallback")
    assert state.is_completed(), state.message
    assert (summary.specs["S01-a"].model, summary.specs["S02-b"].model) == ("claude", "codex")
    assert summary.specs["S02-b"].cost_usd is None, "Codex prints no cost: unknown, not $0"
    assert summary.specs["S02-b"].input_tokens == 700
    found = totals(get_settings())
    assert found["by_model"]["codex"]["attempts_without_cost"] == 1 and found["cost_usd"] == pytest.approx(0.04)
    report = CliRunner().invoke(app, ["report", "fallback"]).output
    assert "| S01-a | succeeded | local | claude | 1 |" in report and "$0.0400" in report, report
    assert "## Usage" in report and "| codex | 1 | - | 700 | 90 |" in report, report
    status = CliRunner().invoke(app, ["status", "fallback"], terminal_width=200).output
    assert "usage: $0.0400 reported" in status and "1 attempt(s) reported no cost" in status, status
    # the server sees it too: the flow run's report artifact carries the same usage
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    markdown = next(a.data for a in artifacts if a.type == "markdown")
    table = next(a.data for a in artifacts if a.type == "table")
    table = json.loads(table) if isinstance(table, str) else table
    assert "| codex | 1 | - | 700 | 90 |" in markdown and "$0.0400" in markdown, markdown
    assert {row["spec"]: row["cost_usd"] for row in table} == {"S01-a": pytest.approx(0.04), "S02-b": None}


def test_usage_travels_back_in_the_worker_result_artifact(prefect_api: str) -> None:
    from types import SimpleNamespace

    from prefect import flow
    from prefect.artifacts import create_table_artifact
    from prefect.client.orchestration import get_client

    from dispatch.core.results import SpecResult
    from dispatch.prefect.worker_transport import RESULT_ARTIFACT_DESCRIPTION, WorkerTransport

    sent = SpecResult.model_validate({
        "project": "demo", "task_id": "S01", "status": "succeeded",
        "attempts": [{"model": "claude", "verdict": "ok", "usage": {"source": "claude", "cost_usd": 0.04,
                                                                   "input_tokens": 1200, "output_tokens": 300}},
                     {"model": "codex", "verdict": "ok", "usage": None}]})

    @flow
    def spec_run_result() -> None:  # what flows/spec_run.py attaches to its flow run on the worker
        create_table_artifact(table=[sent.model_dump(mode="json")], description=RESULT_ARTIFACT_DESCRIPTION)

    run_state = spec_run_result(return_state=True)
    with get_client(sync_client=True) as client:  # read back as the dispatcher's worker transport does
        data = WorkerTransport._result_artifact(SimpleNamespace(client=client), run_state.state_details.flow_run_id)
    received = SpecResult.from_runner(data, project="demo", task_id="S01")
    assert received.attempts[0].usage == sent.attempts[0].usage and received.attempts[1].usage is None
    assert received.usage().cost_usd == pytest.approx(0.04)


def test_team_mode_budgets_count_what_other_machines_spent_today(prefect_api: str, isolated_home: Path,
                                                                 monkeypatch) -> None:
    from dispatch.core.budgets import machine_key
    from dispatch.core.results import SpecResult
    from dispatch.core.settings import get_settings
    from dispatch.core.usage import append_ledger, ledger_records, utc_day
    from dispatch.prefect.spend import budgets_for, team_spend

    def machine(home: str):  # another DISPATCH_HOME is another machine's ledger
        (isolated_home / home).mkdir(exist_ok=True)
        monkeypatch.setenv("DISPATCH_HOME", str(isolated_home / home))
        monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 0.05}')
        get_settings.cache_clear()
        return get_settings()

    first = machine("machine-a")
    spent = SpecResult.model_validate({"project": "demo", "task_id": "S01", "status": "succeeded", "attempts": [
        {"model": "claude", "verdict": "ok", "ended_at": time.time(), "usage": {"cost_usd": 0.05}}]})
    append_ledger(first.results_dir, ledger_records(spent, user="alice", run_id="r1"), first.usage_ledger_bytes)
    from prefect.variables import Variable

    stale = f"dispatch_usage_{time.strftime('%Y%m%d', time.gmtime(time.time() - 8 * 86400))}_{machine_key(first)}"
    recent = f"dispatch_usage_{time.strftime('%Y%m%d', time.gmtime(time.time() - 6 * 86400))}_{machine_key(first)}"
    for name in (stale, recent):
        Variable.set(name, {"model": {"claude": 1.0}}, overwrite=True)
    budgets = budgets_for(first)
    budgets.refresh()  # what the flow does after each result: count it, and publish it in team mode (a thread)
    budgets.close()  # and at the run's end: the publication is out
    assert team_spend(utc_day(time.time()))[machine_key(first)]["model"] == {"claude": 0.05}
    assert Variable.get(stale) is None and Variable.get(recent) is not None, "a week of days is kept, no more"
    Variable.unset(recent)
    second = machine("machine-b")
    chain, why = budgets_for(second).check(["claude"], "bob", [])
    assert chain == [] and why.startswith("budget reached: claude $0.05 of $0.05"), why
    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    assert budgets_for(get_settings()).check(["claude"], "bob", []) == (["claude"], ""), \
        "without the server only this machine's ledger counts"
