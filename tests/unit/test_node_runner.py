"""The node-side runner, run as the nodes run it: a real `python3 runner.pyz ...` subprocess per call.

Steps are tiny bash scripts; agent steps `echo` the providers' real messages (PROVIDER_MESSAGES.md).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.core.agents import build_steps
from dispatch.core.specs import Spec
from dispatch.runner import zipapp
from tests.fixtures.runner import RUNNER_PATH, RUNNER_VERSION

FAKE_AGENT = Path(__file__).resolve().parents[1] / "fixtures" / "fake_agent.py"
# The interpreter that runs the runner: set DISPATCH_TEST_NODE_PYTHON=python3.8 to check the oldest one.
NODE_PYTHON = os.environ.get("DISPATCH_TEST_NODE_PYTHON", sys.executable)

# Real provider messages (PROVIDER_MESSAGES.md), as the agent CLIs print them.
GLM_1308 = (
    'API Error: 429 {"error":{"code":"1308","message":"已达到 5 小时的使用上限。'
    '您的限额将在 2026-08-25 07:41:44 重置。"}}'
)
CLAUDE_RATE_LIMIT = "API Error: Rate limit reached"
# The same, as `claude -p --output-format stream-json --verbose` ends it (exit code 0, anthropics/claude-code#79500).
CLAUDE_RATE_LIMIT_RESULT = (
    '{"type":"result","subtype":"success","is_error":true,"result":"API Error: Rate limit reached","session_id":"s"}'
)
AUTH_401 = 'API Error: 401 {"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'


# -- helpers -------------------------------------------------------------------------------------------------


def _write_task(run_dir: Path, steps: list[dict], **fields: object) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    task = {
        "project": "demo",
        "task_id": run_dir.name,
        "workdir": str(run_dir.parent / f"{run_dir.name}-work"),
        "timeout": 30,
        "stall_timeout": 20,
        "heartbeat": 0.5,
        "steps": steps,
    }
    task.update(fields)
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    return Path(str(task["workdir"]))


def _runner(
    *args: str,
    stdin: str | None = None,
    python: str = NODE_PYTHON,
    runner: Path = RUNNER_PATH,
    site: bool = False,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """One runner call; without site-packages (-S) unless asked: it needs none and starts faster."""
    command = [python, str(runner), *args] if site else [python, "-S", str(runner), *args]
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [NODE_PYTHON, "-S", str(RUNNER_PATH), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _shell(script: str, name: str = "shell") -> dict:
    return {"name": name, "script": script}


def _agent(name: str, script: str, **env: str) -> dict:
    """A model step whose "CLI" is bash running `script` (in argv form, so its output is classified)."""
    return {"name": name, "argv": ["bash", "-c", script], "env": env}


def _says(message: str, exit_code: int) -> str:
    return f"echo {shlex.quote(message)}; exit {exit_code}"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _status(run_dir: Path) -> dict:
    done = _runner("status", str(run_dir))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_for(check: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _gone(pid: int) -> bool:
    """True if pid no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _pid_file(workdir: Path, name: str = "bg.pid") -> int:
    return int(_wait_for(lambda: (workdir / name).exists() and (workdir / name).read_text().strip(), what=name))


# -- shell steps -----------------------------------------------------------------------------------------------


def test_shell_step_success_writes_log_status_and_result(tmp_path: Path) -> None:
    run_dir = tmp_path / "S01"
    workdir = _write_task(run_dir, [_shell('echo "hello from $0"\necho out > made.txt\necho done')])
    done = _runner("run", str(run_dir))
    assert done.returncode == 0, done.stderr
    log = (run_dir / "task.log").read_text()
    assert "=== step shell (attempt 1) ===" in log
    assert f"hello from {run_dir / 'script.sh'}" in log
    assert "hello from" in done.stdout  # non-detached run streams the log
    result = _json(run_dir / "result.json")
    assert result["status"] == "succeeded" and result["model"] == "shell" and result["exit_code"] == 0
    assert (result["project"], result["task_id"]) == ("demo", "S01")
    assert [(a["model"], a["verdict"], a["exit_code"]) for a in result["attempts"]] == [("shell", "ok", 0)]
    assert result["files_changed"] == ["made.txt"] and (workdir / "made.txt").exists()
    assert result["ended_at"] >= result["started_at"] and result["duration"] >= 0
    assert "done" in result["log_tail"] and result["acceptance"] == []
    assert result["runner_version"] == RUNNER_VERSION
    status = _json(run_dir / "status.json")
    assert status["state"] == "succeeded" and status["log_bytes"] == (run_dir / "task.log").stat().st_size


def test_files_copied_in_just_before_the_start_are_not_the_specs_work(tmp_path: Path) -> None:
    """scp mode copies the project in right before the runner starts: those files (same second, even a
    half-written one another spec was copying back) must not be copied back as this spec's change."""
    run_dir = tmp_path / "S01"
    workdir = _write_task(run_dir, [_shell("echo new > made.txt\necho again >> kept.txt")])
    workdir.mkdir()
    for name in ("copied.txt", "kept.txt", "empty.txt"):
        (workdir / name).write_text("" if name == "empty.txt" else "from the dispatcher\n")
    done = _runner("run", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert sorted(_json(run_dir / "result.json")["files_changed"]) == ["kept.txt", "made.txt"]


def test_shell_step_failure_is_failed_with_exit_code_and_stops_at_first_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "S02"
    _write_task(run_dir, [_shell("echo before\nfalse\necho never")])
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "failed" and result["exit_code"] == 1
    assert result["attempts"][0]["verdict"] == "failure"
    assert "never" not in (run_dir / "task.log").read_text()


def test_shell_step_output_is_never_classified_as_a_rate_limit(tmp_path: Path) -> None:
    run_dir = tmp_path / "S03"
    _write_task(run_dir, [_shell(_says(GLM_1308, 0)), _shell("echo second", name="other")])
    assert _runner("run", str(run_dir)).returncode == 0
    assert _json(run_dir / "result.json")["attempts"][0]["verdict"] == "ok"
    _write_task(run_dir, [_shell(_says(GLM_1308, 1)), _shell("echo second", name="other")])
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert [a["verdict"] for a in result["attempts"]] == ["failure"]
    assert (run_dir / "result.prev.json").exists() and (run_dir / "task.prev.log").exists()


# -- limits and orphans ----------------------------------------------------------------------------------------


def test_hard_timeout_kills_the_whole_group_including_a_background_child(tmp_path: Path) -> None:
    run_dir = tmp_path / "S04"
    workdir = _write_task(run_dir, [_shell("sleep 60 &\necho $! > bg.pid\necho started\nsleep 60")], timeout=1)
    began = time.monotonic()
    assert _runner("run", str(run_dir)).returncode == 1
    assert time.monotonic() - began < 10
    result = _json(run_dir / "result.json")
    assert result["status"] == "timeout" and result["attempts"][0]["verdict"] == "timeout"
    assert _gone(_pid_file(workdir))
    assert "hard timeout" in (run_dir / "task.log").read_text()


def test_stalled_step_is_killed_with_its_children(tmp_path: Path) -> None:
    run_dir = tmp_path / "S05"
    workdir = _write_task(run_dir, [_shell("echo hi\nsleep 60 &\necho $! > bg.pid\nwait")], stall_timeout=1)
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "stalled" and "no output for 1s" in result["reason"]
    assert _gone(_pid_file(workdir))


def test_background_processes_left_by_a_finished_step_are_killed(tmp_path: Path) -> None:
    run_dir = tmp_path / "S06"
    workdir = _write_task(
        run_dir, [_shell("sleep 60 >/dev/null 2>&1 &\necho $! > quiet.pid\nsleep 60 &\necho $! > noisy.pid\necho done")]
    )
    began = time.monotonic()
    assert _runner("run", str(run_dir)).returncode == 0
    assert time.monotonic() - began < 10
    assert _gone(_pid_file(workdir, "quiet.pid")) and _gone(_pid_file(workdir, "noisy.pid"))


def test_agent_that_hangs_on_a_rate_limit_moves_on_to_the_next_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "S07"
    _write_task(
        run_dir,
        [_agent("claude", f"echo {shlex.quote(CLAUDE_RATE_LIMIT)}; sleep 60"), _agent("glm", "echo fixed it")],
        stall_timeout=1,
    )
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert [(a["model"], a["verdict"]) for a in result["attempts"]] == [("claude", "transient"), ("glm", "ok")]
    assert "stalled" in result["attempts"][0]["reason"]


# -- detach, status, refusal, kill, tail -------------------------------------------------------------------------


def test_detached_run_outlives_its_parent_and_status_reports_alive_then_succeeded(tmp_path: Path) -> None:
    run_dir = tmp_path / "S08"
    _write_task(run_dir, [_shell("echo started\nsleep 2\necho finished")])
    began = time.monotonic()
    done = _runner("run", str(run_dir), "--detach")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 2  # returned before the step could finish
    info = json.loads(done.stdout)
    assert info["run_dir"] == str(run_dir) and isinstance(info["pid"], int)
    status = _status(run_dir)
    assert status["state"] == "running" and status["alive"] and status["runner_pid"] == info["pid"]
    assert "heartbeat_at" in status and "started_at" in status
    _wait_for(lambda: _status(run_dir)["state"] == "succeeded", what="succeeded")
    assert "finished" in (run_dir / "task.log").read_text()
    _wait_for(lambda: not _status(run_dir)["alive"], what="runner exit")
    final = _status(run_dir)
    assert final["result"]["status"] == "succeeded" and not final["stale"]


def test_second_run_on_a_live_run_dir_refuses_and_kill_stops_the_first(tmp_path: Path) -> None:
    run_dir = tmp_path / "S09"
    workdir = _write_task(run_dir, [_shell("sleep 60 &\necho $! > bg.pid\nsleep 60")])
    first = json.loads(_runner("run", str(run_dir), "--detach").stdout)
    bg_pid = _pid_file(workdir)
    for extra in ((), ("--detach",)):
        again = _runner("run", str(run_dir), *extra)
        assert again.returncode == 3, again.stderr
        assert json.loads(again.stdout) == {"already_running": True, "pid": first["pid"], "run_dir": str(run_dir)}
        assert "another runner" in again.stderr
    assert _status(run_dir)["alive"]
    killed = _runner("kill", str(run_dir))
    assert killed.returncode == 0 and json.loads(killed.stdout)["was_running"]
    assert _gone(first["pid"]) and _gone(bg_pid)
    result = _json(run_dir / "result.json")
    assert result["status"] == "killed" and result["attempts"][0]["verdict"] == "killed"
    assert _status(run_dir)["state"] == "killed"


def test_step_left_by_a_hard_killed_runner_blocks_reruns_until_kill(tmp_path: Path) -> None:
    run_dir = tmp_path / "S09b"
    workdir = _write_task(run_dir, [_shell("sleep 60 &\necho $! > bg.pid\nsleep 60")])
    runner_pid = json.loads(_runner("run", str(run_dir), "--detach").stdout)["pid"]
    bg_pid = _pid_file(workdir)
    os.kill(runner_pid, signal.SIGKILL)  # as the OOM killer would
    _wait_for(lambda: _status(run_dir)["stale"], what="stale status")
    again = _runner("run", str(run_dir))
    assert again.returncode == 3 and "still runs" in again.stderr
    assert json.loads(again.stdout)["orphan_step_pid"] == _json(run_dir / "status.json")["step_pid"]
    assert json.loads(_runner("kill", str(run_dir)).stdout)["was_running"]
    assert _gone(bg_pid)
    assert _json(run_dir / "result.json")["status"] == "killed"
    assert _runner("run", str(run_dir), "--detach").returncode == 0
    assert _runner("kill", str(run_dir)).returncode == 0


def test_sigterm_to_the_runner_kills_the_step_and_marks_killed(tmp_path: Path) -> None:
    run_dir = tmp_path / "S10"
    workdir = _write_task(run_dir, [_shell("sleep 60 &\necho $! > bg.pid\nsleep 60")])
    proc = _start("run", str(run_dir))
    bg_pid = _pid_file(workdir)
    _wait_for(lambda: _json(run_dir / "status.json").get("step_pid"), what="step_pid")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 1
    assert _json(run_dir / "result.json")["status"] == "killed"
    assert _gone(bg_pid)


def test_kill_and_status_with_nothing_running(tmp_path: Path) -> None:
    (tmp_path / "S11").mkdir()
    killed = _runner("kill", str(tmp_path / "S11"))
    assert killed.returncode == 0 and not json.loads(killed.stdout)["was_running"]
    status = _status(tmp_path / "S11")
    assert status["state"] == "absent" and not status["alive"]


def test_tail_prints_the_log_from_a_byte_offset(tmp_path: Path) -> None:
    run_dir = tmp_path / "S12"
    _write_task(run_dir, [_shell("echo one\necho two")])
    _runner("run", str(run_dir))
    log = (run_dir / "task.log").read_bytes()
    offset = log.index(b"two")
    assert _runner("tail", str(run_dir)).stdout.encode() == log
    assert _runner("tail", str(run_dir), "--from-byte", str(offset)).stdout.encode() == log[offset:]
    assert _runner("tail", str(tmp_path / "missing")).stdout == ""


# -- the model chain -----------------------------------------------------------------------------------------


def test_quota_hit_moves_on_to_the_next_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "S13"
    _write_task(run_dir, [_agent("glm", _says(GLM_1308, 1)), _agent("minimax", "echo did the work")])
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert result["status"] == "succeeded" and result["model"] == "minimax"
    glm, minimax = result["attempts"]
    assert (glm["model"], glm["verdict"], glm["exit_code"]) == ("glm", "quota", 1)
    assert isinstance(glm["reset_at"], float) and "1308" in glm["reason"]
    assert (minimax["model"], minimax["verdict"]) == ("minimax", "ok")
    assert "=== step minimax (attempt 2) ===" in (run_dir / "task.log").read_text()


def test_rate_limit_result_with_exit_0_and_auth_errors_move_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "S14"
    _write_task(
        run_dir,
        [
            _agent("claude", _says(CLAUDE_RATE_LIMIT_RESULT, 0)),
            _agent("glm", _says(AUTH_401, 1)),
            _agent("codex", "echo ok"),
        ],
    )
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert [a["verdict"] for a in result["attempts"]] == ["transient", "auth", "ok"]
    assert result["model"] == "codex"


def test_billing_error_moves_on_to_the_next_model_at_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "S13b"
    arrears = 'API Error: 429 {"error":{"code":"1113","message":"Your account is in arrears, please recharge"}}'
    _write_task(run_dir, [_agent("glm", _says(arrears, 1)), _agent("minimax", "echo did the work")])
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert [(a["model"], a["verdict"]) for a in result["attempts"]] == [("glm", "billing"), ("minimax", "ok")]
    assert "1113" in result["attempts"][0]["reason"]


def test_successful_run_whose_summary_quotes_a_limit_is_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "S14b"
    summary = "Done. The banner now reads:\n- You've hit your limit · resets 1:30am (Asia/Dhaka)"
    workdir = _write_task(run_dir, [_agent("claude", _says(summary, 0)), _agent("glm", "touch second-ran")])
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert (result["status"], result["model"]) == ("succeeded", "claude")
    assert [a["verdict"] for a in result["attempts"]] == ["ok"]
    assert not (workdir / "second-ran").exists()


def test_a_300_kib_prompt_reaches_the_agent_whole_on_stdin(tmp_path: Path) -> None:
    """Over the kernel's 128 KiB limit for one argv element: in argv it failed with "Argument list too long"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").symlink_to(FAKE_AGENT)
    prompt = "# Task S30\n\nFAKE: mode=ok\n" + "".join(f"line {n:06d} " + "x" * 1012 + "\n" for n in range(300))
    assert len(prompt.encode()) > 300 * 1024
    steps = build_steps(Spec(task_id="S30", path=tmp_path / "S30.md", body="", models=["claude"]), prompt)
    assert all(prompt not in part for part in steps[0]["argv"])
    run_dir, log = tmp_path / "S30", tmp_path / "fake.jsonl"
    _write_task(run_dir, steps, node_env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, env={"FAKE_AGENT_LOG": str(log)})
    done = _runner("run", str(run_dir))
    assert done.returncode == 0, (run_dir / "task.log").read_text()[-2000:]
    received = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
    assert received["prompt_chars"] == len(prompt)
    assert received["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert (run_dir / "prompt.txt").stat().st_mode & 0o777 == 0o600


def test_step_stdin_must_be_text(tmp_path: Path) -> None:
    run_dir = tmp_path / "S31"
    _write_task(run_dir, [{"name": "claude", "argv": ["claude", "-p"], "stdin": ["not", "text"]}])
    done = _runner("run", str(run_dir))
    assert done.returncode == 2
    assert "steps[0] (claude): 'stdin' must be a string" in done.stderr


def test_plain_failure_does_not_fall_through_to_the_next_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "S15"
    workdir = _write_task(
        run_dir, [_agent("glm", _says("error: 3 tests failed", 1)), _agent("minimax", "touch second-ran")]
    )
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "failed" and result["model"] == "glm" and len(result["attempts"]) == 1
    assert result["attempts"][0]["verdict"] == "failure"
    assert not (workdir / "second-ran").exists()


def test_missing_cli_falls_through_and_fails_clearly_when_last(tmp_path: Path) -> None:
    run_dir = tmp_path / "S16"
    missing = {"name": "glm", "argv": ["no-such-agent-cli-xyz", "-p", "do it"]}
    _write_task(run_dir, [missing, _agent("minimax", "echo ok")])
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert [(a["model"], a["verdict"]) for a in result["attempts"]] == [("glm", "failure"), ("minimax", "ok")]
    assert "no agent CLI 'no-such-agent-cli-xyz' on PATH for model glm" in result["attempts"][0]["reason"]
    _write_task(run_dir, [missing])
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "failed" and "no agent CLI 'no-such-agent-cli-xyz'" in result["reason"]


def test_models_on_cool_down_are_skipped_and_no_steps_fail(tmp_path: Path) -> None:
    run_dir = tmp_path / "S17"
    _write_task(run_dir, [_agent("glm", "touch glm-ran"), _agent("minimax", "echo ok")], skip_models=["glm"])
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert result["skipped_models"] == ["glm"] and [a["model"] for a in result["attempts"]] == ["minimax"]
    _write_task(run_dir, [])
    assert _runner("run", str(run_dir)).returncode == 1
    assert "no steps" in _json(run_dir / "result.json")["reason"]


# -- acceptance, secrets, task.json ---------------------------------------------------------------------------


def test_acceptance_commands_pass_or_fail_the_result(tmp_path: Path) -> None:
    run_dir = tmp_path / "S18"
    _write_task(
        run_dir, [_agent("glm", "echo 42 > answer.txt")], acceptance=["grep -q 42 answer.txt", "echo checking; exit 4"]
    )
    assert _runner("run", str(run_dir)).returncode == 1
    result = _json(run_dir / "result.json")
    assert result["status"] == "acceptance_failed" and result["model"] == "glm"
    passed, failed = result["acceptance"]
    assert (passed["command"], passed["passed"], passed["exit_code"]) == ("grep -q 42 answer.txt", True, 0)
    assert (failed["passed"], failed["exit_code"]) == (False, 4) and "checking" in failed["output_tail"]
    _write_task(run_dir, [_agent("glm", "echo 42 > answer.txt")], acceptance=["grep -q 42 answer.txt"])
    assert _runner("run", str(run_dir)).returncode == 0
    assert _json(run_dir / "result.json")["status"] == "succeeded"


def test_acceptance_command_is_capped(tmp_path: Path) -> None:
    run_dir = tmp_path / "S19"
    _write_task(run_dir, [_shell("true")], acceptance=["sleep 30"], acceptance_timeout=0.5)
    assert _runner("run", str(run_dir)).returncode == 1
    (record,) = _json(run_dir / "result.json")["acceptance"]
    assert not record["passed"] and record["exit_code"] is None and "timed out" in record["output_tail"]


def test_secrets_from_stdin_reach_the_step_and_are_masked_everywhere(tmp_path: Path) -> None:
    run_dir = tmp_path / "S20"
    secret = "sk-test-0123456789abcdef"
    digest = hashlib.sha256(secret.encode()).hexdigest()  # task.json must not hold the secret itself
    _write_task(
        run_dir,
        [
            _agent(
                "glm",
                'echo "token is $ANTHROPIC_AUTH_TOKEN"; '
                'sum=$(printf %s "$ANTHROPIC_AUTH_TOKEN" | sha256sum); '
                f'[ "${{sum%% *}}" = {digest} ] && echo token-matches',
            )
        ],
    )
    done = _runner("run", str(run_dir), "--secrets-stdin", stdin=json.dumps({"ANTHROPIC_AUTH_TOKEN": secret}))
    assert done.returncode == 0, done.stderr
    log = (run_dir / "task.log").read_text()
    assert "token is ***" in log and "token-matches" in log
    assert secret not in done.stdout + done.stderr
    malformed = _runner("run", str(run_dir), "--secrets-stdin", stdin=json.dumps([secret]))
    assert malformed.returncode == 2 and "JSON object" in malformed.stderr
    assert secret not in malformed.stdout + malformed.stderr
    for path in [*run_dir.rglob("*"), *(tmp_path / "S20-work").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_invalid_task_json_fails_clearly_with_exit_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "S21"
    _write_task(run_dir, [{"name": "glm"}])
    done = _runner("run", str(run_dir))
    assert done.returncode == 2 and "needs exactly one of 'argv'" in done.stderr
    assert _json(run_dir / "result.json")["status"] == "failed"
    assert _runner("run", str(tmp_path / "nowhere")).returncode == 2


def test_git_workdir_reports_changed_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "S22"
    workdir = _write_task(run_dir, [_shell("echo changed >> tracked.txt\necho new > sub/new.txt")])
    (workdir / "sub").mkdir(parents=True)
    (workdir / "tracked.txt").write_text("v1\n")
    (workdir / "untouched.txt").write_text("v1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(workdir)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    assert _runner("run", str(run_dir)).returncode == 0
    assert sorted(_json(run_dir / "result.json")["files_changed"]) == ["sub/new.txt", "tracked.txt"]


# -- shipped to a node -------------------------------------------------------------------------------------------


def test_runner_source_parses_as_python_3_8() -> None:
    sources = Path(zipapp.__file__).parent
    for name in zipapp.sources():
        ast.parse((sources / name).read_text(encoding="utf-8"), filename=name, feature_version=(3, 8))


def _oldest_python() -> str | None:
    """A working python3.8 (the oldest the nodes may have), if this machine has one."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path(pwd.getpwuid(os.getuid()).pw_dir) / ".pyenv")
    candidates = [*sorted(pyenv.glob("versions/3.8*/bin/python3.8")), shutil.which("python3.8")]
    for candidate in map(str, filter(None, candidates)):
        if os.path.isfile(candidate):
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
            )
            if probe.returncode == 0 and probe.stdout.strip() == "(3, 8)":
                return candidate
    return None


def test_shipped_copy_runs_beside_its_classifier_under_the_oldest_python(tmp_path: Path) -> None:
    """Copied as the dispatcher ships it; run by python3.8 when this machine has one."""
    ship = tmp_path / "ship"
    ship.mkdir()
    (ship / "runner.pyz").write_bytes(zipapp.build().data)
    run_dir = tmp_path / "S23"
    _write_task(run_dir, [_shell("echo on the node")])
    python = _oldest_python() or sys.executable
    done = _runner("run", str(run_dir), python=python, runner=ship / "runner.pyz", site=True)
    assert done.returncode == 0, done.stderr
    result = _json(run_dir / "result.json")
    assert result["status"] == "succeeded" and result["runner_version"] == RUNNER_VERSION
    version = json.loads(_runner("version", runner=ship / "runner.pyz", site=True).stdout)
    assert version["ratelimits"] == str(ship / "runner.pyz" / "dispatch_runner" / "ratelimits.py")


def test_shipped_classifier_imports_under_python_3_8(tmp_path: Path) -> None:
    python = _oldest_python() or sys.executable
    shutil.copy(RUNNER_PATH, tmp_path / RUNNER_PATH.name)
    version = json.loads(_runner("version", python=python, runner=tmp_path / RUNNER_PATH.name).stdout)
    assert version["ratelimits"] == str(tmp_path / RUNNER_PATH.name / "dispatch_runner" / "ratelimits.py")


# -- the node agent's slot count -------------------------------------------------------------------------------


class _Agent:
    """A `runner.pyz serve` on a run root, spoken to as the SSH transport does (JSON lines)."""

    def __init__(self, root: Path, slots: int) -> None:
        self.proc = subprocess.Popen([NODE_PYTHON, "-S", str(RUNNER_PATH), "serve", "--root", str(root),
                                      "--slots", str(slots)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.root, self.ids = root, 0

    def run(self, task_id: str, script: str) -> dict:
        """Ask for a run of `script` as project `p`'s `task_id`; the first event that answers it."""
        self.ids += 1
        run_dir = self.root / "p" / "tasks" / task_id
        task = {"project": "p", "task_id": task_id, "workdir": str(run_dir / "work"), "timeout": 30,
                "stall_timeout": 20, "heartbeat": 0.5, "steps": [_shell(script)], "cache_key": task_id}
        self.proc.stdin.write(json.dumps({"op": "run", "id": self.ids, "run_dir": str(run_dir), "task": task}) + "\n")
        self.proc.stdin.flush()
        while True:
            event = json.loads(self.proc.stdout.readline())
            if event["id"] == self.ids and event["event"] != "log":
                return event

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_the_agent_counts_runners_started_the_long_way_and_forgets_dead_ones(tmp_path: Path) -> None:
    root = tmp_path / "root"
    long_way = root / "p" / "tasks" / "A"
    _write_task(long_way, [_shell("sleep 2")], workdir=str(long_way / "work"))
    started = _runner("run", str(long_way), "--detach")
    assert started.returncode == 0, started.stderr
    assert not (root / ".live").exists()  # no agent has made `root` a run root yet: nothing written above A
    (root / ".live").mkdir()  # as an earlier agent left it
    # a runner killed before it could remove its entry: the entry points at a directory nobody holds
    (root / "p" / "tasks" / "DEAD").mkdir(parents=True)
    os.symlink(root / "p" / "tasks" / "DEAD", root / ".live" / "p@DEAD")
    # an entry that is no runner's (it points elsewhere): removed, and nothing is removed where it points
    (tmp_path / "elsewhere" / "q" / "tasks" / "X").mkdir(parents=True)
    (tmp_path / "elsewhere" / ".live").mkdir()
    (tmp_path / "elsewhere" / ".live" / "q@X").write_text("keep")
    os.symlink(tmp_path / "elsewhere" / "q" / "tasks" / "X", root / ".live" / "p@BOGUS")
    agent = _Agent(root, slots=1)
    try:
        assert agent.run("B", "true")["event"] == "full"  # A holds the one slot; DEAD does not count
        assert os.readlink(root / ".live" / "p@A") == str(long_way.resolve())  # entered by the agent's scan
        assert not (root / ".live" / "p@DEAD").is_symlink() and not (root / ".live" / "p@BOGUS").is_symlink()
        assert (tmp_path / "elsewhere" / ".live" / "q@X").read_text() == "keep"
        _wait_for(lambda: _json(long_way / "status.json").get("state") == "succeeded", what="A to end")
        _wait_for(lambda: not (root / ".live" / "p@A").is_symlink(), what="A's entry to go")
        assert agent.run("B", "sleep 1")["event"] == "started"
        _wait_for(lambda: (root / ".live" / "p@B").is_symlink(), what="B to enter itself")
    finally:
        agent.close()


@pytest.mark.parametrize("layout", [("inner", "S30"), ("p", "tasks", "S30")])
def test_a_runner_outside_a_run_root_writes_nothing_above_its_directory(tmp_path: Path, layout) -> None:
    """Neither a directory not laid out as a run's, nor one laid out as `<name>/tasks/<id>` in a directory no
    agent has made a run root, gets a registry entry above it."""
    top = tmp_path / "top"
    run_dir = top.joinpath(*layout)
    _write_task(run_dir, [_shell("true")])
    assert _runner("run", str(run_dir)).returncode == 0
    assert _json(run_dir / "status.json")["state"] == "succeeded"
    assert not list(tmp_path.rglob(".live"))


# -- the CLIs' own retries, refusals and hangs: the chain moves on in seconds (issue 20) ----------------------

API_RETRY = ('{"type":"system","subtype":"api_retry","attempt":%d,"max_retries":10,"retry_delay_ms":30000,'
             '"error_status":429,"error":"rate_limit","session_id":"s"}')  # Claude Code 2.1 stream-json


def test_an_agent_retrying_by_itself_is_shown_and_passed_over_after_the_retry_limit(tmp_path: Path) -> None:
    run_dir = tmp_path / "S40"
    events = "; ".join(f"echo {shlex.quote(API_RETRY % n)}" for n in (1, 2))
    _write_task(run_dir, [_agent("glm", f"{events}; sleep 60"), _agent("claude", "echo done")],
                stall_timeout=20, retry_limit=1.5)
    began = time.monotonic()
    assert _runner("run", str(run_dir)).returncode == 0
    assert time.monotonic() - began < 10  # not the 20 s stall, nor glm's own 10 retries
    result = _json(run_dir / "result.json")
    glm, claude = result["attempts"]
    assert (glm["verdict"], claude["verdict"], result["model"]) == ("transient", "ok", "claude")
    assert glm["retries"] == 2 and glm["last_retry"] == "429, retrying 2/10 in 30s"
    assert "gave up after 1.5s of its own retries" in glm["reason"]
    log = (run_dir / "task.log").read_text(encoding="utf-8")
    assert "=== runner: glm: 429, retrying 1/10 in 30s ===" in log and "retrying 2/10" in log


def test_reconnecting_lines_are_not_progress_for_the_stall_check(tmp_path: Path) -> None:
    run_dir = tmp_path / "S41"
    # codex with its endpoint unreachable never exits: it says this every ~35 s (here every 0.2 s)
    waiting = "while true; do echo 'Reconnecting... waiting for network'; sleep 0.2; done"
    _write_task(run_dir, [_agent("codex", waiting), _agent("claude", "echo done")], timeout=15, stall_timeout=20,
                retry_limit=1)
    assert _runner("run", str(run_dir), timeout=40).returncode == 0
    result = _json(run_dir / "result.json")
    assert [(a["model"], a["verdict"]) for a in result["attempts"]] == [("codex", "transient"), ("claude", "ok")]
    assert "waiting for network" in result["attempts"][0]["reason"]


def test_a_cli_refusing_to_start_names_the_fix_and_the_chain_moves_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "S42"
    refusal = "error: unexpected argument '--full-auto' found\n\nUsage: codex exec [OPTIONS] [PROMPT]"
    root = "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons"
    _write_task(run_dir, [_agent("codex", _says(refusal, 2)), _agent("glm", _says(root, 1)),
                          _agent("claude", "echo done")])
    assert _runner("run", str(run_dir)).returncode == 0
    codex, glm, claude = _json(run_dir / "result.json")["attempts"]
    assert (codex["verdict"], glm["verdict"], claude["verdict"]) == ("config", "config", "ok")
    assert "--full-auto" in codex["reason"] and "IS_SANDBOX=1" in glm["reason"]


def test_an_agent_that_hangs_with_no_output_falls_back_unless_it_is_the_last_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "S43"
    _write_task(run_dir, [_agent("glm", "sleep 60"), _agent("claude", "echo done")], stall_timeout=1)
    assert _runner("run", str(run_dir)).returncode == 0
    result = _json(run_dir / "result.json")
    assert [(a["model"], a["verdict"]) for a in result["attempts"]] == [("glm", "stalled"), ("claude", "ok")]
    last = tmp_path / "S44"
    _write_task(last, [_agent("glm", "sleep 60")], stall_timeout=1)
    assert _runner("run", str(last)).returncode == 1
    assert _json(last / "result.json")["status"] == "stalled"
