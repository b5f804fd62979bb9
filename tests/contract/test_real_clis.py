"""The contract tier: the pinned real agent CLIs (agents/package-lock.json) run specs through `dispatch start`,
on the local node and on an SSH loopback node, against the fake model API (tests/fixtures/fake_provider.py).

What the fake agent (tests/fixtures/fake_agent.py) stands in for in the fast tiers is proved here: each CLI
starts with the argv and environment dispatch gives it (as root too), reaches the endpoint its model names with
its own key, does a real tool round trip that writes hello.txt, reports its tokens (and Claude Code its cost),
and a limited or unreachable model passes the spec to the next model in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.contract.conftest import (
    KEYS,
    SYSTEM_PATH,
    agent_spec,
    dispatch_start,
    result_attempts,
    task_log,
)
from tests.fixtures.fake_provider import USAGE, WRITTEN_TEXT, FakeProvider, key_hash

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

FALLBACK_SECONDS = 15.0  # from a limited or unreachable first model's start to the next model's first request


def _asked(provider: FakeProvider, model: str) -> list[dict]:
    """The model API requests made with `model`'s key (each model has its own, conftest.KEYS)."""
    return [r for r in provider.seen() if r["key"] == key_hash(KEYS[model]) and r["path"].endswith(
        ("/messages", "/responses"))]


def _explain(started, task_id: str) -> str:
    row = started.state.specs.get(task_id) if started.state else None
    attempts = json.dumps(result_attempts(row), indent=1)[-2000:] if row else ""
    return f"{started.output[-3000:]}\n--- attempts\n{attempts}\n--- task.log\n{task_log(row) if row else ''}"


def _wrote(project_dir: Path) -> str:
    path = project_dir / "hello.txt"
    return path.read_text() if path.is_file() else f"(no {path})"


def test_claude_code_writes_the_file_and_reports_tokens_and_cost(point_models, provider: FakeProvider,
                                                                  isolated_home: Path):
    point_models(claude=provider.url("success"))
    agent_spec(isolated_home / "specs" / "cc", "S01-hello", ["claude"])
    started = dispatch_start("cc")
    assert started.returncode == 0, _explain(started, "S01-hello")
    row = started.row("S01-hello")
    assert (row.state, row.model) == ("succeeded", "claude"), _explain(started, "S01-hello")
    assert _wrote(isolated_home / "projects" / "cc") == WRITTEN_TEXT
    asked = _asked(provider, "claude")
    assert [r["tool_result"] for r in asked] == [False, True], "one Write call, then its result, then the end"
    assert "Write" in asked[0]["tools"]
    assert (row.input_tokens, row.output_tokens) == (2 * USAGE["input_tokens"], 2 * USAGE["output_tokens"])
    assert row.cost_usd is not None and row.cost_usd > 0, "Claude Code's result event carries total_cost_usd"


def test_codex_writes_the_file_and_reports_tokens(point_models, provider: FakeProvider, isolated_home: Path):
    point_models(codex=provider.url("success") + "/v1")
    agent_spec(isolated_home / "specs" / "cx", "S01-hello", ["codex"])
    started = dispatch_start("cx")
    assert started.returncode == 0, _explain(started, "S01-hello")
    row = started.row("S01-hello")
    assert (row.state, row.model) == ("succeeded", "codex"), _explain(started, "S01-hello")
    assert _wrote(isolated_home / "projects" / "cx") == WRITTEN_TEXT
    asked = _asked(provider, "codex")
    assert [r["tool_result"] for r in asked] == [False, True], "one shell call, then its output, then the end"
    assert (row.input_tokens, row.output_tokens) == (2 * USAGE["input_tokens"], 2 * USAGE["output_tokens"])


def test_a_rate_limited_glm_passes_to_claude_in_seconds_and_cools_down_for_the_next_spec(
        point_models, provider: FakeProvider, isolated_home: Path):
    point_models(glm=provider.url("429_retry_after"), claude=provider.url("success"))
    specs = isolated_home / "specs" / "limited"
    agent_spec(specs, "S01-first", ["glm", "claude"])
    agent_spec(specs, "S02-second", ["glm", "claude"], depends_on=["S01"])
    started = dispatch_start("limited")
    assert started.returncode == 0, _explain(started, "S01-first")
    assert {t: (r.state, r.model) for t, r in started.state.specs.items()} == {
        "S01-first": ("succeeded", "claude"), "S02-second": ("succeeded", "claude")}, _explain(started, "S01-first")
    glm, claude = _asked(provider, "glm"), _asked(provider, "claude")
    assert glm and all(r["scenario"] == "429_retry_after" for r in glm)
    assert claude[0]["time"] - glm[0]["time"] <= FALLBACK_SECONDS, \
        f"claude started {claude[0]['time'] - glm[0]['time']:.1f} s after glm's first 429"
    assert len(glm) == 1, "glm answered 429: S01 must not retry it, and S02 must start on claude (cool-down)"
    assert _wrote(isolated_home / "projects" / "limited") == WRITTEN_TEXT


def test_an_unreachable_glm_passes_to_claude_in_seconds(point_models, provider: FakeProvider, refused_url: str,
                                                        isolated_home: Path):
    point_models(glm=refused_url, claude=provider.url("success"))
    agent_spec(isolated_home / "specs" / "refused", "S01-hello", ["glm", "claude"])
    started = dispatch_start("refused")
    assert started.returncode == 0, _explain(started, "S01-hello")
    row = started.row("S01-hello")
    assert (row.state, row.model) == ("succeeded", "claude"), _explain(started, "S01-hello")
    assert _first_attempt_seconds(row, "glm") <= FALLBACK_SECONDS, _explain(started, "S01-hello")
    assert _wrote(isolated_home / "projects" / "refused") == WRITTEN_TEXT


def _first_attempt_seconds(row, model: str) -> float:
    attempts = [a for a in result_attempts(row) if a.get("model") == model]
    assert attempts, f"no attempt of {model}: {json.dumps(result_attempts(row))[-2000:]}"
    return attempts[0]["ended_at"] - attempts[0]["started_at"]


def test_an_unreachable_codex_passes_to_claude_though_it_says_it_is_reconnecting(
        point_models, provider: FakeProvider, refused_url: str, isolated_home: Path):
    """Codex never gives up on an endpoint it cannot reach: it prints "Reconnecting... waiting for network"
    after 0, 5, 15, 35 s, then about every 35 s. Those lines are no progress: the stall limit (30 s here) must
    end it ~30 s after it started, not ~65 s (30 s after the last such line) or never."""
    point_models(codex=refused_url + "/v1", claude=provider.url("success"))
    agent_spec(isolated_home / "specs" / "cx-refused", "S01-hello", ["codex", "claude"])
    started = dispatch_start("cx-refused", env={"DISPATCH_STALL_TIMEOUT": "30"})
    assert started.returncode == 0, _explain(started, "S01-hello")
    row = started.row("S01-hello")
    assert (row.state, row.model) == ("succeeded", "claude"), _explain(started, "S01-hello")
    assert _first_attempt_seconds(row, "codex") <= 45, _explain(started, "S01-hello")


def test_a_hanging_glm_passes_to_claude_at_the_stall_limit(point_models, provider: FakeProvider,
                                                           isolated_home: Path):
    """The endpoint accepts and never answers: the CLI prints nothing; the stall limit ends it and the chain
    moves on (a hang is a reason to fall back, not a failure of the spec)."""
    point_models(glm=provider.url("hang"), claude=provider.url("success"))
    agent_spec(isolated_home / "specs" / "hang", "S01-hello", ["glm", "claude"])
    started = dispatch_start("hang", env={"DISPATCH_STALL_TIMEOUT": "8"})
    assert started.returncode == 0, _explain(started, "S01-hello")
    row = started.row("S01-hello")
    assert (row.state, row.model) == ("succeeded", "claude"), _explain(started, "S01-hello")
    assert _first_attempt_seconds(row, "glm") <= 8 + FALLBACK_SECONDS, _explain(started, "S01-hello")


@pytest.fixture
def ssh_node(loopback_cluster, node_agents: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch):
    """DISPATCH_HOME/nodes.json with one loopback node (its own login user as root) whose PATH has the pinned
    CLIs; no server slots (the session's SQLite server cannot hold them: see test_cluster_flow.py)."""
    monkeypatch.setenv("DISPATCH_SERVER_SLOTS", "false")
    node = {**loopback_cluster.node("loop1"), "env": {"PATH": f"{node_agents}:{SYSTEM_PATH}"}}
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [node]}))
    return node


def test_claude_code_and_codex_work_on_an_ssh_node(point_models, provider: FakeProvider, ssh_node: dict,
                                                   isolated_home: Path):
    point_models(claude=provider.url("success"), codex=provider.url("success") + "/v1")
    specs = isolated_home / "specs" / "remote"
    agent_spec(specs, "S01-claude", ["claude"])
    agent_spec(specs, "S02-codex", ["codex"], depends_on=["S01"])
    started = dispatch_start("remote")
    assert started.returncode == 0, _explain(started, "S01-claude") + _explain(started, "S02-codex")
    rows = started.state.specs
    assert {t: (r.state, r.model, r.node) for t, r in rows.items()} == {
        "S01-claude": ("succeeded", "claude", ssh_node["name"]), "S02-codex": ("succeeded", "codex", ssh_node["name"])}
    assert [r["tool_result"] for r in _asked(provider, "claude")] == [False, True]
    assert [r["tool_result"] for r in _asked(provider, "codex")] == [False, True]
    assert rows["S01-claude"].cost_usd and rows["S02-codex"].output_tokens == 2 * USAGE["output_tokens"]
    assert _wrote(isolated_home / "projects" / "remote") == WRITTEN_TEXT


def test_a_rate_limited_glm_passes_to_claude_on_an_ssh_node(point_models, provider: FakeProvider, ssh_node: dict,
                                                            isolated_home: Path):
    point_models(glm=provider.url("glm_1302"), claude=provider.url("success"))
    agent_spec(isolated_home / "specs" / "remote-limited", "S01-hello", ["glm", "claude"])
    started = dispatch_start("remote-limited")
    assert started.returncode == 0, _explain(started, "S01-hello")
    row = started.row("S01-hello")
    assert (row.state, row.model, row.node) == ("succeeded", "claude", ssh_node["name"]), \
        _explain(started, "S01-hello")
    glm, claude = _asked(provider, "glm"), _asked(provider, "claude")
    assert glm and claude, _explain(started, "S01-hello")
    assert claude[0]["time"] - glm[0]["time"] <= FALLBACK_SECONDS, \
        f"claude started {claude[0]['time'] - glm[0]['time']:.1f} s after glm's first 429 ({len(glm)} glm requests)"
