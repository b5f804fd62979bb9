"""`verify: [codex]` through the project flow: a rejection fails the attempt, and its review reaches the retry.

The agent (`claude`) and the verifier (`codex`) are the fake agent CLI; every call is recorded with its role and
its whole prompt in FAKE_AGENT_LOG, which reaches the steps through the local node's `env` in nodes.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.projects import write_spec

pytestmark = pytest.mark.prefect


def _local_node_logging_to(isolated_home: Path) -> Path:
    log = isolated_home / "fake.jsonl"
    nodes = {"nodes": [{"name": "local", "transport": "local", "slots": 2, "env": {"FAKE_AGENT_LOG": str(log)}}]}
    (isolated_home / "home" / "nodes.json").write_text(json.dumps(nodes))
    return log


def test_a_verifier_that_rejects_once_hands_its_review_to_the_retry(run_project, fake_agents, isolated_home: Path):
    log = _local_node_logging_to(isolated_home)
    write_spec(isolated_home / "specs" / "verified", "S01-total.md",
               {"task_id": "S01-total", "model": ["claude"], "verify": ["codex"], "retries": 2},
               "## Goal\nApply the discount in total.py.\n\nFAKE: write total.py price = price * discount\n"
               "FAKE: model=codex verdicts=reject,approve\nFAKE: review the discount is applied twice\n\n"
               "## Acceptance criteria\n- [ ] `grep -q discount total.py`\n")
    state, summary = run_project("verified")
    assert state.is_completed(), state.message
    assert summary.specs["S01-total"].attempts == 2
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["role"] for c in calls] == ["agent", "verify", "agent", "verify"]
    first, retry = calls[0]["prompt"], calls[2]["prompt"]
    assert "Review (call 1)" not in first
    assert "# Review of your previous attempt" in retry
    assert "Review (call 1): the discount is applied twice." in retry, "the verifier's review must reach the retry"
    assert "price = price * discount" in calls[1]["prompt"], "the verifier reviews the change itself"


def test_a_spec_whose_verifier_cli_is_missing_fails_and_is_never_approved(run_project, fake_agents,
                                                                         isolated_home: Path):
    write_spec(isolated_home / "specs" / "noverifier", "S01-a.md",
               {"task_id": "S01-a", "model": ["claude"], "verify": ["opencode"]},
               "## Goal\nWrite a.\n\nFAKE: write a.txt done\n")
    state, summary = run_project("noverifier")
    assert state.is_failed()
    row = summary.specs["S01-a"]
    assert row.state == "failed" and "verifier" in row.reason and "opencode" in row.reason
    assert row.attempts == 1, "a missing verifier CLI is not fixed by retrying"
