"""The fake agent CLI, run as a real subprocess, and the classifier's verdict on what it prints.

This ties the test double to the classifier: every provider mode must classify as that provider's kind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatch.runner.ratelimits import classify

FAKE_AGENT = Path(__file__).resolve().parents[1] / "fixtures" / "fake_agent.py"
PYTHON = (sys.executable, "-S")  # the fake is standard library only; skipping site keeps 30 starts cheap
RESET_AHEAD = 7200.0

EXPECTED = {  # mode: (exit code, kind)
    "ok": (0, "ok"),
    "fail": (1, "failure"),
    "claude-usage-epoch": (1, "quota"),
    "claude-usage-reset-at": (1, "quota"),
    "claude-hit-limit": (1, "quota"),
    "claude-session-limit": (1, "quota"),
    "claude-extra-usage": (1, "quota"),
    "claude-api-rate-limit-exit0": (0, "transient"),  # caught by is_error in the structured forms only
    "claude-api-rate-limit-json": (0, "transient"),
    "anthropic-429": (1, "transient"),
    "claude-rate-limit-event": (1, "quota"),
    "claude-rate-limit-event-allowed": (0, "ok"),
    "codex-usage-relative": (1, "quota"),
    "codex-usage-absolute": (1, "quota"),
    "codex-usage-json": (1, "quota"),
    "openai-tpm": (1, "transient"),
    "glm-1302": (1, "transient"),
    "glm-1305": (1, "transient"),
    "glm-1308": (1, "quota"),
    "minimax-quota": (1, "quota"),
    "overloaded-529": (1, "transient"),
    "auth-401": (1, "auth"),
    "auth-invalid-key": (1, "auth"),
    "trap-429": (0, "ok"),
    "summary-quotes-limit": (0, "ok"),
    "codex-quota-exceeded": (1, "billing"),
    "openai-insufficient-quota": (1, "billing"),
    "glm-1113": (1, "billing"),
    "glm-1003": (1, "auth"),
    "minimax-1008": (1, "billing"),
    "minimax-1004": (1, "auth"),
    "minimax-1002": (1, "transient"),
    "anthropic-credit-low": (1, "billing"),
}
# Plain text cannot tell Claude's exit-0 "API Error: Rate limit reached" from an agent quoting it: only the
# structured forms (the built-in models' commands) catch it.
TEXT_KIND = {"claude-api-rate-limit-exit0": "ok"}
FORMATS = {  # how the built-in models run the CLIs (dispatch/core/agents.py), and plain text
    "text": ("-p", "do the task"),
    "stream-json": ("-p", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions"),
    "codex-json": ("exec", "--json", "--full-auto", "-"),
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_AGENT_", "ANTHROPIC_"))}
    env.update(extra)
    return env


def _run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON, str(FAKE_AGENT), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or _clean_env(),
        cwd=cwd,
        timeout=10,
    )


def _read(proc: subprocess.Popen[bytes], *, until: str = "", within: float = 5.0) -> str:
    """What the process prints within ``within`` seconds, stopping early once ``until`` appears."""
    assert proc.stdout is not None
    printed = ""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0 and not (until and until in printed):
        ready, _, _ = select.select([proc.stdout], [], [], left)
        data = os.read(proc.stdout.fileno(), 65536) if ready else b""
        if not data:
            break
        printed += data.decode()
    return printed


def test_every_provider_mode_has_an_expectation() -> None:
    spec = importlib.util.spec_from_file_location("fake_agent", FAKE_AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.MESSAGE_MODES) | {"ok", "fail"} == set(EXPECTED)


@pytest.fixture(scope="module")
def mode_runs() -> dict[tuple[str, str], tuple[float, int, str]]:
    """Every mode in every format, run at once: (mode, format) -> (start time, exit code, stdout + stderr)."""
    started = time.time()
    procs = {}
    for form, args in FORMATS.items():
        for mode in EXPECTED:
            procs[mode, form] = subprocess.Popen(
                [*PYTHON, str(FAKE_AGENT), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_clean_env(FAKE_AGENT_MODE=mode),
            )
    runs = {}
    for key, proc in procs.items():
        output = proc.communicate("do the task", timeout=30)[0]
        runs[key] = (started, proc.returncode, output)
    return runs


@pytest.mark.parametrize("form", sorted(FORMATS))
@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_mode_prints_what_the_classifier_expects(
    mode: str, form: str, mode_runs: dict[tuple[str, str], tuple[float, int, str]]
) -> None:
    exit_code, kind = EXPECTED[mode]
    if form == "text":
        kind = TEXT_KIND.get(mode, kind)
    started, returncode, output = mode_runs[mode, form]
    verdict = classify(output, returncode)
    assert returncode == exit_code, output
    assert verdict.kind == kind, (verdict, output)
    if kind == "quota":
        assert verdict.reset_at == pytest.approx(started + RESET_AHEAD, abs=120)


def test_model_directive_applies_only_to_that_model(tmp_path: Path) -> None:
    prompt = "Build it.\nFAKE: model=glm mode=glm-1308\nFAKE: write out/result.txt built by the fake\n"
    glm = _run("-p", prompt, env=_clean_env(FAKE_AGENT_MODEL="glm"), cwd=tmp_path)
    assert classify(glm.stdout + glm.stderr, glm.returncode).kind == "quota"
    assert not (tmp_path / "out" / "result.txt").exists()

    minimax = _run("-p", prompt, env=_clean_env(FAKE_AGENT_MODEL="minimax"), cwd=tmp_path)
    assert minimax.returncode == 0
    assert (tmp_path / "out" / "result.txt").read_text() == "built by the fake\n"


def test_prompt_directive_beats_environment_mode() -> None:
    result = _run("-p", "FAKE: mode=fail", env=_clean_env(FAKE_AGENT_MODE="ok"))
    assert result.returncode == 1


def test_write_directives_write_then_append(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("stale from an earlier run\n")
    prompt = "FAKE: write notes.md first line\nFAKE: write notes.md second line\nFAKE: write a/b/c.txt x y  z"
    result = _run("exec", "--full-auto", prompt, cwd=tmp_path)
    assert result.returncode == 0
    assert (tmp_path / "notes.md").read_text() == "first line\nsecond line\n"
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "x y  z\n"


def test_prompt_can_come_on_stdin(tmp_path: Path) -> None:
    result = _run("-p", "--output-format", "text", stdin="FAKE: write from-stdin.txt yes\n", cwd=tmp_path)
    assert result.returncode == 0
    assert (tmp_path / "from-stdin.txt").read_text() == "yes\n"


def test_opencode_run_style_arguments(tmp_path: Path) -> None:
    result = _run("run", "--model", "glm", "FAKE: mode=openai-tpm", cwd=tmp_path)
    assert classify(result.stdout + result.stderr, result.returncode).retry_after == pytest.approx(1.574)


def test_reset_seconds_can_be_set_per_directive() -> None:
    started = time.time()
    result = _run("-p", "FAKE: mode=claude-usage-epoch reset=60")
    assert classify(result.stdout, result.returncode).reset_at == pytest.approx(started + 60, abs=5)


def test_log_line_per_run_names_the_command_it_was_called_as(tmp_path: Path) -> None:
    claude = tmp_path / "claude"
    claude.symlink_to(FAKE_AGENT)
    log = tmp_path / "calls.jsonl"
    env = _clean_env(FAKE_AGENT_LOG=str(log), FAKE_AGENT_MODEL="minimax")
    for _ in range(2):
        subprocess.run([*PYTHON, str(claude), "-p", "hi"], env=env, cwd=tmp_path, check=True, timeout=10)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2
    assert records[0]["argv0"] == "claude" and records[0]["model"] == "minimax" and records[0]["mode"] == "ok"
    assert records[0]["cwd"] == str(tmp_path) and records[0]["pid"] != records[1]["pid"]
    assert abs(records[0]["start"] - time.time()) < 30


def test_anthropic_variable_names_are_printed_but_never_values() -> None:
    env = _clean_env(ANTHROPIC_BASE_URL="https://glm.example/api", ANTHROPIC_AUTH_TOKEN="secret-value-123")
    result = _run("-p", "hi", env=env)
    assert "ANTHROPIC_AUTH_TOKEN" in result.stdout and "ANTHROPIC_BASE_URL" in result.stdout
    assert "secret-value-123" not in result.stdout + result.stderr
    assert "glm.example" not in result.stdout + result.stderr


def test_unknown_mode_exits_2_listing_the_modes() -> None:
    result = _run("-p", "FAKE: mode=nonsense")
    assert result.returncode == 2
    assert "glm-1308" in result.stderr


def test_version_flag_answers_without_a_prompt() -> None:
    assert _run("--version").returncode == 0


@pytest.mark.parametrize(("mode", "last_line"), [("hang", "thinking"), ("stall-after:0.2", "still working 1")])
def test_hang_and_stall_go_silent_and_stay_alive(mode: str, last_line: str) -> None:
    command = [*PYTHON, str(FAKE_AGENT), "-p", f"FAKE: mode={mode}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, env=_clean_env())
    try:
        assert last_line in _read(proc, until=last_line)
        assert _read(proc, within=0.6) == ""
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_slow_prints_progress_then_succeeds(tmp_path: Path) -> None:
    result = _run("-p", "FAKE: mode=slow:0.3\nFAKE: write done.txt ok", cwd=tmp_path)
    assert result.returncode == 0
    assert "working 1" in result.stdout
    assert (tmp_path / "done.txt").read_text() == "ok\n"


def _final_text(output: str) -> str:
    """The last message in Codex's or Claude Code's events (the agent's answer)."""
    answer = ""
    for line in output.splitlines():
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("type") == "item.completed":
            answer = event["item"]["text"]
        elif event.get("type") == "result":
            answer = event["result"]
    return answer


def test_verifier_follows_its_verdict_plan_across_attempts_and_never_writes(tmp_path: Path) -> None:
    prompt = ("Review it.\nFAKE: verdicts=reject,approve\nFAKE: review the total ignores the discount\n"
              "FAKE: write out.txt the agent's work\n")
    env = _clean_env(DISPATCH_STEP_KIND="verify", DISPATCH_RUN_DIR=str(tmp_path))
    answers = [_final_text(_run(*FORMATS[form], env=env, stdin=prompt, cwd=tmp_path).stdout)
               for form in ("codex-json", "stream-json", "codex-json")]
    assert answers[0].splitlines()[-1] == "VERDICT: REJECT" and "the total ignores the discount" in answers[0]
    assert answers[1].splitlines()[-1] == "VERDICT: APPROVE"
    assert answers[2].splitlines()[-1] == "VERDICT: APPROVE", "the plan's last verdict repeats"
    assert not (tmp_path / "out.txt").exists(), "a verifier only reviews"


def test_verifier_can_answer_without_a_verdict(tmp_path: Path) -> None:
    env = _clean_env(DISPATCH_STEP_KIND="verify", DISPATCH_RUN_DIR=str(tmp_path))
    result = _run(*FORMATS["codex-json"], env=env, stdin="FAKE: verdicts=none\n", cwd=tmp_path)
    assert result.returncode == 0 and "VERDICT" not in _final_text(result.stdout)


def test_log_records_the_prompt_and_the_role(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    _run("-p", "the whole prompt\nFAKE: mode=ok", env=_clean_env(FAKE_AGENT_LOG=str(log)), cwd=tmp_path)
    _run("-p", "FAKE: verdicts=approve", env=_clean_env(FAKE_AGENT_LOG=str(log), DISPATCH_STEP_KIND="verify",
                                                          DISPATCH_RUN_DIR=str(tmp_path)), cwd=tmp_path)
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert (first["role"], first["prompt"]) == ("agent", "the whole prompt\nFAKE: mode=ok")
    assert second["role"] == "verify"


def test_ui_review_directive_answers_a_scores_line_per_model(tmp_path: Path) -> None:
    prompt = "<html>\nFAKE: ui-review=22,20,19,24\nFAKE: model=codex ui-review=garbage\n</html>\n"
    claude = _final_text(_run(*FORMATS["stream-json"], env=_clean_env(FAKE_AGENT_MODEL="claude"), stdin=prompt).stdout)
    line = claude.splitlines()[-1]
    assert line.startswith("UI-REVIEW: ")
    scores = json.loads(line.removeprefix("UI-REVIEW: "))
    assert {k: v["score"] for k, v in scores.items()} == {"visual": 22, "layout": 20, "readability": 19, "finish": 24}
    assert all(v["reason"] for v in scores.values())
    codex = _final_text(_run(*FORMATS["codex-json"], env=_clean_env(FAKE_AGENT_MODEL="codex"), stdin=prompt).stdout)
    assert codex.splitlines()[-1] == "UI-REVIEW: garbage"
