"""The project flow on Prefect's real API: schedule, locks, retries, failures and caching.

Every claim is judged from the timestamps the specs record themselves (tests/fixtures/projects.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.fixtures.projects import max_concurrency, overlap, read_timeline, shell_spec, write_spec

pytestmark = pytest.mark.prefect


def _intervals(runs):
    return [(s, e) for task_runs in runs.values() for s, e in task_runs]


def test_slots_are_never_exceeded_and_are_used(run_project, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "wide", isolated_home / "timeline"
    for i in range(6):
        shell_spec(specs, f"S{i:02d}", timeline, seconds=0.6)
    state, summary = run_project("wide", slots=2)
    assert state.is_completed(), state.message
    runs = read_timeline(timeline)
    assert sorted(runs) == [f"S{i:02d}" for i in range(6)]
    assert max_concurrency(_intervals(runs)) == 2
    assert summary.counts() == {"succeeded": 6}


def test_overlapping_modifies_never_run_together_while_others_do(run_project, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "locks", isolated_home / "timeline"
    shell_spec(specs, "S01-a", timeline, seconds=0.8, modifies=["src/app.py"])
    shell_spec(specs, "S02-b", timeline, seconds=0.8, modifies=["src/"])
    shell_spec(specs, "S03-c", timeline, seconds=0.8, modifies=["src/*.py"])
    shell_spec(specs, "S04-d", timeline, seconds=0.8, modifies=["docs/guide.md"])
    shell_spec(specs, "S05-e", timeline, seconds=0.8, modifies=["tests/**/*.py"])
    state, _ = run_project("locks", slots=4)
    assert state.is_completed(), state.message
    runs = {k: v[0] for k, v in read_timeline(timeline).items()}
    for a, b in [("S01-a", "S02-b"), ("S01-a", "S03-c"), ("S02-b", "S03-c")]:
        assert not overlap(runs[a], runs[b]), f"{a} and {b} lock the same files but ran together"
    assert overlap(runs["S04-d"], runs["S05-e"]), "specs with disjoint modifies should run in parallel"
    assert any(overlap(runs["S04-d"], runs[x]) for x in ("S01-a", "S02-b", "S03-c"))


def test_dependents_start_only_after_their_dependencies_finish(run_project, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "dag", isolated_home / "timeline"
    shell_spec(specs, "S01-root", timeline, seconds=0.5)
    shell_spec(specs, "S02-left", timeline, seconds=0.5, depends_on=["S01"])
    shell_spec(specs, "S03-right", timeline, seconds=0.3, depends_on="S01-root")
    shell_spec(specs, "S04-join", timeline, seconds=0.2, depends_on=["S02", "S03"])
    state, _ = run_project("dag", slots=3)
    assert state.is_completed(), state.message
    runs = {k: v[0] for k, v in read_timeline(timeline).items()}
    assert runs["S02-left"][0] >= runs["S01-root"][1]
    assert runs["S03-right"][0] >= runs["S01-root"][1]
    assert runs["S04-join"][0] >= max(runs["S02-left"][1], runs["S03-right"][1])
    assert overlap(runs["S02-left"], runs["S03-right"])


def test_failed_spec_is_retried_until_it_succeeds(run_project, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "flaky", isolated_home / "timeline"
    counter = isolated_home / "attempts"
    flaky = f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; [ "$n" -ge 2 ] || exit 3'
    shell_spec(specs, "S01-flaky", timeline, seconds=0.1, extra=flaky, retries=3)
    state, summary = run_project("flaky")
    assert state.is_completed(), state.message
    assert counter.read_text().strip() == "3"
    assert summary.specs["S01-flaky"].attempts == 3
    assert len(read_timeline(timeline)["S01-flaky"]) == 3
    # each attempt is a task run named after the spec, as the UI shows it
    assert _task_run_names(state.state_details.flow_run_id) == [
        "S01-flaky", "S01-flaky (attempt 2)", "S01-flaky (attempt 3)"]


def _task_run_names(flow_run_id) -> list[str]:
    """The names of a flow run's task runs, once the server has recorded them (from events)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    names: list[str] = []
    with get_client(sync_client=True) as client:
        for _ in range(50):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            names = sorted(run.name for run in runs)
            if len(names) >= 3:
                break
            time.sleep(0.2)
    return names


def test_failure_stops_only_its_dependents(run_project, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "broken", isolated_home / "timeline"
    shell_spec(specs, "S01-bad", timeline, seconds=0.1, extra="exit 7", retries=1)
    shell_spec(specs, "S02-child", timeline, depends_on=["S01"])
    shell_spec(specs, "S03-grandchild", timeline, depends_on=["S02"])
    shell_spec(specs, "S04-independent", timeline, seconds=0.2)
    state, summary = run_project("broken")
    assert state.is_failed()
    rows = summary.specs
    assert rows["S01-bad"].state == "failed" and rows["S01-bad"].attempts == 2
    assert rows["S01-bad"].exit_code == 7
    assert rows["S02-child"].state == "not_run" and "S01-bad" in rows["S02-child"].reason
    assert rows["S03-grandchild"].state == "not_run"
    assert rows["S04-independent"].state == "succeeded"
    ran = read_timeline(timeline)
    assert "S02-child" not in ran and "S03-grandchild" not in ran


def test_second_run_is_all_cache_hits_and_an_edit_reruns_only_it_and_its_dependents(run_project, isolated_home):
    specs, timeline = isolated_home / "specs" / "cached", isolated_home / "timeline"
    shell_spec(specs, "S01-base", timeline, seconds=0.1)
    shell_spec(specs, "S02-mid", timeline, seconds=0.1, depends_on=["S01"])
    shell_spec(specs, "S03-leaf", timeline, seconds=0.1, depends_on=["S02"])
    shell_spec(specs, "S04-other", timeline, seconds=0.1, depends_on=["S01"])
    state, _ = run_project("cached")
    assert state.is_completed()
    assert {k: len(v) for k, v in read_timeline(timeline).items()} == dict.fromkeys(
        ["S01-base", "S02-mid", "S03-leaf", "S04-other"], 1)

    state, summary = run_project("cached")
    assert state.is_completed()
    assert all(row.cached for row in summary.specs.values())
    assert {k: len(v) for k, v in read_timeline(timeline).items()} == dict.fromkeys(
        ["S01-base", "S02-mid", "S03-leaf", "S04-other"], 1)

    path = specs / "S02-mid.md"
    path.write_text(path.read_text().replace("Test spec S02-mid.", "Test spec S02-mid, edited."))
    state, summary = run_project("cached")
    assert state.is_completed()
    counts = {k: len(v) for k, v in read_timeline(timeline).items()}
    assert counts == {"S01-base": 1, "S02-mid": 2, "S03-leaf": 2, "S04-other": 1}
    assert [t for t, row in summary.specs.items() if not row.cached] == ["S02-mid", "S03-leaf"]


def test_agent_spec_without_any_agent_cli_fails_clearly(run_project, isolated_home: Path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    write_spec(isolated_home / "specs" / "agents", "S01-agent.md", {"task_id": "S01-agent", "executor": "glm"},
               "## Goal\nDo something clever.\n")
    state, summary = run_project("agents")
    assert state.is_failed()
    row = summary.specs["S01-agent"]
    assert row.state == "failed"
    assert "no agent CLI 'claude' on PATH for model glm" in row.reason
    assert row.attempts == 1, "a missing CLI is not fixed by retrying"


def test_exclusive_spec_runs_alone(run_project, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "excl", isolated_home / "timeline"
    for i in range(1, 4):
        shell_spec(specs, f"S0{i}-work", timeline, seconds=0.4)
    shell_spec(specs, "S04-migrate", timeline, seconds=0.4, exclusive=True)
    shell_spec(specs, "S05-more", timeline, seconds=0.4)
    state, _ = run_project("excl", slots=4)
    assert state.is_completed(), state.message
    runs = {k: v[0] for k, v in read_timeline(timeline).items()}
    for other, interval in runs.items():
        if other != "S04-migrate":
            assert not overlap(interval, runs["S04-migrate"]), f"{other} ran during the exclusive spec"


def test_agent_keys_from_blocks_reach_only_their_model_and_never_the_logs(run_project, isolated_home: Path,
                                                                         monkeypatch):
    from blocks.agent_model import AgentModel

    fakebin = isolated_home / "fakebin"
    fakebin.mkdir()
    (fakebin / "claude").symlink_to(Path(__file__).parent.parent / "fixtures" / "fake_agent.py")
    monkeypatch.setenv("PATH", f"{fakebin}:/usr/bin:/bin")
    secret = "sk-test-do-not-print-7f3a9c"
    block = AgentModel.builtin("minimax")
    block.api_key = secret
    block.save("minimax", overwrite=True)
    try:
        specs = isolated_home / "specs" / "keys"
        write_spec(specs, "S01-agent.md", {"task_id": "S01-agent", "model": ["minimax"]},
                   "## Goal\nEcho the key. FAKE: write out.txt ok\n")
        state, summary = run_project("keys")
        assert state.is_completed(), state.message
        log = Path(summary.specs["S01-agent"].log_path).read_text()
        assert "ANTHROPIC_AUTH_TOKEN" in log, "the model's key env var must reach the agent"
        for path in (isolated_home / "home").rglob("*"):
            if path.is_file() and "prefect" not in path.parts:
                assert secret not in path.read_text(errors="replace"), f"the key leaked into {path}"
    finally:
        AgentModel.delete("minimax")


def _flow_run_logs(state) -> list[tuple[int, str]]:
    """(level, message) of every log line of the flow run that ended in `state`, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # sends every log line still queued, then returns
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.level, log.message) for log in logs]


def test_billing_error_moves_on_blocks_the_model_and_says_so_loudly(run_project, fake_agents, isolated_home: Path):
    from prefect.variables import Variable

    specs = isolated_home / "specs" / "billing"
    write_spec(specs, "S01-first.md", {"task_id": "S01-first", "model": ["glm", "claude"]},
               "## Goal\nWrite.\n\nFAKE: model=glm mode=glm-1113\nFAKE: write out/first.txt done\n")
    write_spec(specs, "S02-only-glm.md", {"task_id": "S02-only-glm", "depends_on": ["S01"], "model": ["glm"]},
               "## Goal\nWrite again.\n")
    state, summary = run_project("billing")
    assert summary.specs["S01-first"].state == "succeeded" and summary.specs["S01-first"].model == "claude"
    fallback = summary.specs["S01-first"].fallback  # what `dispatch status` and the report show
    assert fallback.startswith("glm: billing") and fallback.endswith(" -> claude"), fallback
    blocked = Variable.get("dispatch_cooldown_glm")
    assert blocked["kind"] == "billing" and "1113" in blocked["reason"]
    assert blocked["until"] > time.time() + 300 * 86400, "a billing block lasts until a person clears it"
    second = summary.specs["S02-only-glm"]
    assert second.state == "failed" and "dispatch models reset glm" in second.reason
    errors = [message for level, message in _flow_run_logs(state) if level >= logging.ERROR]
    assert any("glm" in m and "billing" in m and "dispatch models reset glm" in m for m in errors), errors


def test_quota_whose_reset_has_passed_still_cools_the_model_down(run_project, fake_agents, isolated_home: Path):
    from prefect.variables import Variable

    from dispatch.runner.ratelimits import MIN_COOLDOWN_SECONDS

    specs = isolated_home / "specs" / "pastreset"
    write_spec(specs, "S01-first.md", {"task_id": "S01-first", "model": ["claude", "codex"]},
               "## Goal\nWrite.\n\nFAKE: model=claude mode=claude-usage-epoch reset=-3600\n")
    began = time.time()
    state, summary = run_project("pastreset")
    assert state.is_completed(), state.message
    assert summary.specs["S01-first"].model == "codex"
    cooling = Variable.get("dispatch_cooldown_claude")
    assert cooling is not None and cooling["until"] >= began + MIN_COOLDOWN_SECONDS


def test_force_runs_every_spec_again_even_with_its_last_result_on_disk(run_project, isolated_home: Path):
    # a killed dispatcher's finished attempts are taken back from their run directories; --force must not be
    timeline = isolated_home / "timeline"
    specs = isolated_home / "specs" / "forced"
    shell_spec(specs, "S01-a", timeline, 0.1)
    shell_spec(specs, "S02-b", timeline, 0.1, depends_on=["S01-a"])
    state, _ = run_project("forced")
    assert state.is_completed(), state.message
    state, summary = run_project("forced", force=True)
    assert state.is_completed(), state.message
    runs = read_timeline(timeline)
    assert len(runs["S01-a"]) == 2 and len(runs["S02-b"]) == 2, runs
    assert not any(row.cached for row in summary.specs.values())


def test_measured_durations_are_kept_and_order_the_next_run(run_project, isolated_home: Path):
    import shutil

    from dispatch.core.durations import DurationHistory
    from dispatch.core.settings import get_settings

    specs, timeline = isolated_home / "specs" / "timed", isolated_home / "timeline"
    shell_spec(specs, "S01-long", timeline, seconds=1.2)
    shell_spec(specs, "S02-quick", timeline, seconds=0.05)
    shell_spec(specs, "S03-quick-after", timeline, seconds=0.05, depends_on=["S02"])

    state, _ = run_project("timed", slots=1)  # nothing measured yet: ranks count specs, so S02's chain of 2 first
    assert state.is_completed(), state.message
    first = sorted(read_timeline(timeline), key=lambda t: read_timeline(timeline)[t][0][0])
    history = DurationHistory.load(get_settings().results_dir, "timed")
    assert set(history.runs) == {"S01-long", "S02-quick", "S03-quick-after"}
    assert history.own("S01-long") > 1.0 > history.own("S02-quick")

    timeline.unlink()
    shutil.rmtree(get_settings().runs_dir / "timed")  # else --force takes the finished attempts' results back
    state, _ = run_project("timed", slots=1, force=True)  # measured: S01 (1.2 s) outweighs S02 + S03 (0.1 s)
    assert state.is_completed(), state.message
    runs = read_timeline(timeline)
    second = sorted(runs, key=lambda t: runs[t][0][0])
    assert first[0] == "S02-quick" and second[0] == "S01-long", (first, second)


def test_order_priority_in_projects_json_starts_by_priority(run_project, isolated_home: Path):
    import json

    specs, timeline = isolated_home / "specs" / "urgent", isolated_home / "timeline"
    shell_spec(specs, "S01-chain", timeline, seconds=0.05)
    shell_spec(specs, "S02-chain-end", timeline, seconds=0.05, depends_on=["S01"])
    shell_spec(specs, "S03-urgent", timeline, seconds=0.05, priority=1)
    (isolated_home / "home" / "projects.json").write_text(json.dumps({"urgent": {"order": "priority"}}))

    state, _ = run_project("urgent", slots=1)

    assert state.is_completed(), state.message
    runs = read_timeline(timeline)
    assert sorted(runs, key=lambda t: runs[t][0][0])[0] == "S03-urgent"
