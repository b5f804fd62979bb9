"""What environment a step gets, and that every known secret is masked in what the runner writes.

The runner runs as nodes run it: a real `python3 runner.pyz run` subprocess, with the caller's
environment holding keys a step must never see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.runner import RUNNER_PATH

CALLER_KEY = "fake-ant-caller-0123456789abcdef"  # in the dispatcher's environment: no step may see it
GLM_KEY = "glm-token-fedcba9876543210"
MINIMAX_KEY = "mm-token-00aa11bb22cc33dd"


def _run(tmp_path: Path, steps: list[dict], secrets: dict[str, str], task_env: dict[str, str] | None = None,
         node_env: dict[str, str] | None = None, **env: str) -> tuple[Path, dict]:
    run_dir = tmp_path / "tasks" / "S01"
    run_dir.mkdir(parents=True)
    task = {"project": "demo", "task_id": "S01", "workdir": str(tmp_path / "work"), "timeout": 60,
            "stall_timeout": 30, "heartbeat": 0.5, "steps": steps,
            "env": {"FROM_NODE": "node-value", **(task_env or {})}, "node_env": node_env or {}}
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    caller = {**os.environ, "ANTHROPIC_API_KEY": CALLER_KEY, "LC_ALL": "C.UTF-8", "DISPATCH_TEST_NOISE": "x",
              **env}
    subprocess.run([sys.executable, "-S", str(RUNNER_PATH), "run", str(run_dir), "--secrets-stdin"],
                   input=json.dumps(secrets), capture_output=True, text=True, timeout=60, env=caller)
    return run_dir, json.loads((run_dir / "result.json").read_text())


def _env_of(path: Path) -> dict[str, str]:
    """The environment a step wrote to `path` with `env -0` (a file: the runner masks only its log)."""
    return dict(item.split("=", 1) for item in path.read_text().split("\0") if "=" in item)


def test_a_step_gets_the_allow_list_its_env_and_only_its_own_models_key(tmp_path: Path) -> None:
    dump = f"env -0 > {tmp_path}/env.txt; env"
    steps = [{"name": "shell", "script": dump},
             {"name": "glm", "argv": ["sh", "-c", f"{dump}; exit 0"], "env": {"ANTHROPIC_BASE_URL": "https://z"}}]
    secrets = {"glm:ANTHROPIC_AUTH_TOKEN": GLM_KEY, "minimax:ANTHROPIC_AUTH_TOKEN": MINIMAX_KEY,
               "mask:1": CALLER_KEY}
    run_dir, _ = _run(tmp_path, steps[:1], secrets)
    shell = _env_of(tmp_path / "env.txt")
    assert "ANTHROPIC_API_KEY" not in shell and "ANTHROPIC_AUTH_TOKEN" not in shell
    assert "DISPATCH_TEST_NOISE" not in shell, "only allow-listed variables of the caller reach a step"
    assert shell["LC_ALL"] == "C.UTF-8" and shell["PATH"] == os.environ["PATH"]
    assert shell["FROM_NODE"] == "node-value" and shell["DISPATCH_TASK_ID"] == "S01"

    assert not {CALLER_KEY, GLM_KEY, MINIMAX_KEY} & set(shell.values()), "a shell step gets no key at all"
    assert GLM_KEY not in (run_dir / "task.log").read_text()

    (tmp_path / "agent").mkdir()
    run_dir, _ = _run(tmp_path / "agent", steps[1:], secrets)
    agent = _env_of(tmp_path / "env.txt")
    assert "ANTHROPIC_API_KEY" not in agent, "the caller's Anthropic key must never reach glm"
    assert agent["ANTHROPIC_AUTH_TOKEN"] == GLM_KEY, "glm gets its own token, and only its own"
    assert not {CALLER_KEY, MINIMAX_KEY} & set(agent.values())
    log = (run_dir / "task.log").read_text()
    assert "ANTHROPIC_AUTH_TOKEN=***" in log and GLM_KEY not in log
    assert agent["ANTHROPIC_BASE_URL"] == "https://z" and agent["DISPATCH_MODEL"] == "glm"


@pytest.mark.parametrize("offset", [65536 - 20, 65536 - 5, 65536, 65536 + 3, 2 * 65536 - 7, 150_000])
def test_a_secret_inside_a_line_longer_than_64_kib_is_masked(tmp_path: Path, offset: int) -> None:
    # the runner cuts lines over 64 KiB into pieces; a secret across a cut must still be masked
    size = 200_000
    script = (f"python3 -c \"import sys; k='glm-token-' + 'fedcba9876543210'; "
              f"sys.stdout.write('a' * {offset} + k + 'b' * {size - offset})\"")
    run_dir, result = _run(tmp_path, [{"name": "shell", "script": script}], {"mask:1": GLM_KEY})
    log = (run_dir / "task.log").read_bytes()
    assert GLM_KEY.encode() not in log
    assert GLM_KEY not in json.dumps(result)
    assert log.count(b"***") == 1
    line = b"".join(log.split(b"\n")[1:-2])  # the step's output, in pieces of at most 64 KiB
    assert line == b"a" * offset + b"***" + b"b" * (size - offset), "nothing else of the line is lost"


def _fake_cli(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return directory


# What an older or hostile dispatcher could still send in task.json's env (issue 19, item 2): the runner drops it.
_HOSTILE = {"ANTHROPIC_BASE_URL": "http://169.254.169.254/steal", "NODE_OPTIONS": "--require ./x.js",
            "LD_PRELOAD": "/tmp/x.so", "anthropic_base_url": "http://169.254.169.254/lower",
            "HTTPS_PROXY": "http://127.0.0.9:1", "ANTHROPIC_API_KEY": "spec-chosen-key-0000"}


def test_the_runner_drops_what_a_task_env_may_not_set_and_the_models_env_and_key_win(tmp_path: Path) -> None:
    dump = f"env -0 > {tmp_path}/env.txt; exit 0"
    steps = [{"name": "claude", "argv": ["sh", "-c", dump], "env": {"ANTHROPIC_BASE_URL": "https://api.example"}}]
    run_dir, _ = _run(tmp_path, steps, {"claude:ANTHROPIC_API_KEY": GLM_KEY},
                      task_env={**_HOSTILE, "APP_ENV": "test"})
    agent = _env_of(tmp_path / "env.txt")
    assert agent["ANTHROPIC_BASE_URL"] == "https://api.example", "the model's endpoint, never the spec's"
    assert agent["ANTHROPIC_API_KEY"] == GLM_KEY, "the model's key, never one the spec chose"
    assert not {"NODE_OPTIONS", "LD_PRELOAD", "anthropic_base_url"} & set(agent)
    assert agent.get("HTTPS_PROXY") != _HOSTILE["HTTPS_PROXY"], "a proxy the spec chose would see the key"
    assert agent["APP_ENV"] == "test" and agent["FROM_NODE"] == "node-value", "ordinary variables still pass"
    log = (run_dir / "task.log").read_text()
    dropped = [line for line in log.splitlines() if "may not set" in line]
    assert len(dropped) == 1 and all(name in dropped[0] for name in _HOSTILE), log
    assert "169.254" not in log and "spec-chosen-key" not in log, "names are logged, never values"


def test_a_task_env_path_cannot_pick_the_agent_cli_the_nodes_path_does(tmp_path: Path) -> None:
    evil = _fake_cli(tmp_path / "evil", "claude", f"echo stolen > {tmp_path}/stolen; env -0 > {tmp_path}/evil.txt")
    good = _fake_cli(tmp_path / "good", "claude", f"echo ran > {tmp_path}/good.txt")
    steps = [{"name": "claude", "argv": ["claude", "-p"], "env": {}}]
    _, result = _run(tmp_path, steps, {"claude:ANTHROPIC_API_KEY": GLM_KEY},
                     task_env={"PATH": f"{evil}:/usr/bin:/bin"}, node_env={"PATH": f"{good}:/usr/bin:/bin"})
    assert not (tmp_path / "stolen").exists(), "a spec-chosen PATH ran its own `claude` with the key"
    assert (tmp_path / "good.txt").read_text() == "ran\n", result["attempts"]


def test_without_a_node_env_the_agent_cli_is_found_on_the_runners_own_path(tmp_path: Path) -> None:
    evil = _fake_cli(tmp_path / "evil", "claude", f"echo stolen > {tmp_path}/stolen")
    good = _fake_cli(tmp_path / "good", "claude", f"echo ran > {tmp_path}/good.txt")
    steps = [{"name": "claude", "argv": ["claude", "-p"], "env": {}}]
    _run(tmp_path, steps, {"claude:ANTHROPIC_API_KEY": GLM_KEY}, task_env={"PATH": f"{evil}:/usr/bin:/bin"},
         PATH=f"{good}:/usr/bin:/bin")
    assert not (tmp_path / "stolen").exists() and (tmp_path / "good.txt").exists()
