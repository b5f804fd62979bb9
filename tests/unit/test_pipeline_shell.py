"""The pipeline's shell steps: our timeout ends the whole process group, the
output tail holds stdout and stderr in order, and a step gets no credential from the dispatcher."""

from __future__ import annotations

import logging
from pathlib import Path

from dispatch.core.processes import pid_alive
from dispatch.pipeline.shell import run_step

ENV = {"PATH": "/usr/bin:/bin"}


def test_a_step_past_its_timeout_is_ended_with_its_children(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    step = run_step("install", f"sleep 300 & echo $! > {pid_file}; echo started; wait", cwd=tmp_path, env=ENV,
                    timeout=2)
    assert step.timed_out and step.exit_code is None and not step.ok
    assert "timed out after" in step.describe()
    child = int(pid_file.read_text())
    assert not pid_alive(child)  # the background sleep was in the step's group: ended with it


def test_the_tail_holds_both_streams_and_the_exit_code(tmp_path: Path):
    step = run_step("build", "echo one; echo two >&2; echo three; exit 7", cwd=tmp_path, env=ENV, timeout=30)
    assert step.exit_code == 7 and step.tail == ["one", "two", "three"]


def test_a_step_sees_only_its_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-abcdefghijklmnop")
    monkeypatch.setenv("DISPATCH_SOMETHING", "x")
    step = run_step("env", "env | cut -d= -f1 | sort", cwd=tmp_path, env={**ENV, "APP_ENV": "test"}, timeout=30)
    assert step.ok
    assert {"PATH", "APP_ENV"} <= set(step.tail)
    assert "OPENAI_API_KEY" not in step.tail and "DISPATCH_SOMETHING" not in step.tail


def test_a_variable_no_shell_can_unset_never_reaches_a_step(tmp_path: Path, monkeypatch):
    # `unset` skips names that are not shell identifiers: the step's environment must be built, not trimmed
    monkeypatch.setenv("MY-API-KEY", "fake-dash-0123456789abcdef")
    monkeypatch.setenv("lower.token", "fake-dot-0123456789abcdef")
    step = run_step("env", "env", cwd=tmp_path, env={**ENV, "APP_ENV": "test"}, timeout=30)
    assert step.ok
    names = {line.split("=", 1)[0] for line in step.tail}
    assert "APP_ENV" in names
    assert not {"MY-API-KEY", "lower.token"} & names, sorted(names)


def test_a_key_a_step_prints_is_masked_in_its_tail_and_its_log_lines(tmp_path: Path, monkeypatch, caplog):
    key = "fake-shop-key-0123456789abcdef"
    monkeypatch.setenv("SHOP_API_KEY", key)  # this process knows it; the step is not given it, but prints it
    with caplog.at_level(logging.INFO):
        step = run_step("install", f"echo 'using key {key}'; echo {key} >&2", cwd=tmp_path, env=ENV, timeout=30)
    assert step.tail == ["using key ***", "***"]
    assert "install: using key ***" in caplog.text
    assert key not in caplog.text
