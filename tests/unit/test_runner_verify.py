"""Verification in the node runner: after the agent and its acceptance commands, the verifier reviews the change.

The runner runs as nodes run it (a real `python3 runner.pyz run` subprocess) and the verifier is the fake
agent CLI in Codex's `exec --json` form, as `verify: [codex]` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dispatch.core.agents import build_verify_steps
from dispatch.core.specs import Spec
from tests.unit.test_node_runner import FAKE_AGENT, _agent, _json, _runner, _write_task


def _verify_task(tmp_path: Path, name: str, plan: str, *, acceptance: list[str] | None = None,
                 verifiers: list[str] | None = None, git: bool = False) -> tuple[Path, Path, Path]:
    """A task whose agent writes total.py, verified by the fake `codex` following `plan`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "codex").exists():
        (bin_dir / "codex").symlink_to(FAKE_AGENT)
    body = (f"## Goal\nApply the discount in total.py.\n\nFAKE: verdicts={plan}\nFAKE: review the discount is "
            "applied twice\n\n## Acceptance criteria\n- [ ] `grep -q discount total.py`\n")
    spec = Spec(task_id=name, path=tmp_path / f"{name}.md", body=body, verify=verifiers or ["codex"],
                acceptance=acceptance if acceptance is not None else ["grep -q discount total.py"])
    run_dir, log = tmp_path / name, tmp_path / "fake.jsonl"
    workdir = _write_task(run_dir, [_agent("glm", "echo 'price = price * discount' > total.py")],
                          acceptance=spec.acceptance, verify=build_verify_steps(spec),
                          env={"FAKE_AGENT_LOG": str(log)}, node_env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    if git:
        workdir.mkdir(parents=True)
        (workdir / "total.py").write_text("price = price\n")
        for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                                                       "start"]):
            subprocess.run(["git", *command], cwd=workdir, check=True, capture_output=True)
    return run_dir, workdir, log


def _verifier_calls(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["role"] == "verify"] if log.exists() else []


def test_approval_succeeds_and_the_verifier_saw_the_change_and_the_criteria(tmp_path: Path) -> None:
    run_dir, _, log = _verify_task(tmp_path, "S40", "approve")
    done = _runner("run", str(run_dir))
    assert done.returncode == 0, (run_dir / "task.log").read_text()[-3000:]
    result = _json(run_dir / "result.json")
    assert result["status"] == "succeeded"
    assert result["verification"]["model"] == "codex" and result["verification"]["verdict"] == "approve"
    (call,) = _verifier_calls(log)
    assert "price = price * discount" in call["prompt"], "the verifier must see the change itself"
    assert "`grep -q discount total.py`" in call["prompt"] and "VERDICT: APPROVE" in call["prompt"]


def test_rejection_fails_the_attempt_with_the_review_as_its_reason(tmp_path: Path) -> None:
    run_dir, _, _ = _verify_task(tmp_path, "S41", "reject")
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "rejected"
    assert "codex" in result["reason"] and "the discount is applied twice" in result["reason"]
    assert result["verification"]["verdict"] == "reject"
    assert "the discount is applied twice" in result["verification"]["review"]


def test_a_git_checkout_shows_the_verifier_the_diff(tmp_path: Path) -> None:
    run_dir, _, log = _verify_task(tmp_path, "S42", "approve", git=True)
    assert _runner("run", str(run_dir)).returncode == 0
    (call,) = _verifier_calls(log)
    assert "-price = price\n+price = price * discount" in call["prompt"]


def test_a_missing_verifier_cli_is_a_failure_never_an_approval(tmp_path: Path) -> None:
    run_dir, _, _ = _verify_task(tmp_path, "S43", "approve", verifiers=["opencode"])
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "failed"
    assert "no verifier gave a verdict" in result["reason"] and "no agent CLI 'opencode'" in result["reason"]
    assert result["verification"]["verdict"] == "none"


def test_an_answer_without_a_verdict_is_a_failure(tmp_path: Path) -> None:
    run_dir, _, _ = _verify_task(tmp_path, "S44", "none")
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "failed" and "no VERDICT line" in result["reason"]


def test_the_verifier_runs_only_after_the_acceptance_commands_pass(tmp_path: Path) -> None:
    run_dir, _, log = _verify_task(tmp_path, "S45", "approve", acceptance=["false"])
    assert _runner("run", str(run_dir)).returncode == 1
    assert _json(run_dir / "result.json")["status"] == "acceptance_failed"
    assert _verifier_calls(log) == []
