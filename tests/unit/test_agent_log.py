"""An agent's JSON output (Claude Code stream-json, Codex --json) reads as text in task.log, whole in events.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.runner import RUNNER_PATH

FAKE_AGENT = Path(__file__).parent.parent / "fixtures" / "fake_agent.py"
CLAUDE = ["claude", "-p", "--output-format", "stream-json", "--verbose"]


def _run(tmp_path: Path, steps: list[dict]) -> tuple[Path, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("claude", "codex"):
        (bin_dir / name).unlink(missing_ok=True)
        (bin_dir / name).symlink_to(FAKE_AGENT)
    run_dir = tmp_path / "tasks" / "S01"
    run_dir.mkdir(parents=True, exist_ok=True)
    task = {"project": "demo", "task_id": "S01", "workdir": str(tmp_path / "work"), "timeout": 60,
            "stall_timeout": 30, "heartbeat": 0.5, "steps": steps,
            "node_env": {"PATH": f"{bin_dir}:/usr/bin:/bin"}}
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    subprocess.run([sys.executable, "-S", str(RUNNER_PATH), "run", str(run_dir)], capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL)
    return run_dir, json.loads((run_dir / "result.json").read_text())


def test_stream_json_reads_as_text_in_the_log_and_stays_whole_in_events(tmp_path: Path) -> None:
    prompt = "FAKE: mode=ok\nFAKE: write out.txt done\n"
    run_dir, result = _run(tmp_path, [{"name": "glm", "argv": CLAUDE, "stdin": prompt}])
    assert result["status"] == "succeeded", result["reason"]
    log = (run_dir / "task.log").read_text()
    assert "fake-agent: wrote out.txt" in log and "=== agent result: success" in log
    assert '{"type"' not in log, "no raw JSON event in task.log"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "system" and events[-1]["type"] == "result"
    assert any("wrote out.txt" in json.dumps(e) for e in events)


def test_a_limit_in_stream_json_still_moves_on_to_the_next_model(tmp_path: Path) -> None:
    prompt = "FAKE: model=glm mode=claude-api-rate-limit-exit0\nFAKE: model=minimax mode=ok\n"
    run_dir, result = _run(tmp_path, [{"name": "glm", "argv": CLAUDE, "stdin": prompt,
                                       "env": {"FAKE_AGENT_MODEL": "glm"}},
                                      {"name": "minimax", "argv": CLAUDE, "stdin": prompt,
                                       "env": {"FAKE_AGENT_MODEL": "minimax"}}])
    assert result["status"] == "succeeded" and result["model"] == "minimax"
    assert result["attempts"][0]["verdict"] in ("transient", "quota")
    log = (run_dir / "task.log").read_text()
    assert "=== agent error:" in log and '{"type"' not in log


def test_codex_json_reads_as_text(tmp_path: Path) -> None:
    prompt = "FAKE: mode=ok\n"
    run_dir, result = _run(tmp_path, [{"name": "codex", "argv": ["codex", "exec", "--json", "--full-auto", "-"],
                                       "stdin": prompt}])
    assert result["status"] == "succeeded", result["reason"]
    log = (run_dir / "task.log").read_text()
    assert "fake-agent: done" in log and '{"type"' not in log
