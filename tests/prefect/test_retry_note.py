"""A running spec's row says while its agent CLI retries by itself: the node runner's line "=== runner: glm: 429,
retrying 2/10 in 30s ===" becomes the row's reason ("glm: 429, retrying 2/10", what `dispatch status` shows),
until the agent makes progress again or the next step starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.run_spec import retry_note
from tests.fixtures.projects import write_spec

pytestmark = pytest.mark.prefect


def _watch(state_file: Path, task_id: str, wanted: str, copy: Path, *, present: bool) -> str:
    """Bash: wait (at most 15 s) until the state file's row of `task_id` has (or no longer has) `wanted` in its
    reason, then copy the state file to `copy`."""
    check = (f"python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))[\"specs\"][\"{task_id}\"]; "
             f"sys.exit(0 if (sys.argv[2] in r[\"reason\"]) == {present} else 1)' {state_file} '{wanted}'")
    return (f"for i in $(seq 150); do {check} 2>/dev/null && break; sleep 0.1; done\n"
            f"cp {state_file} {copy}\n")


def test_the_runners_retry_line_is_the_running_rows_reason_until_the_agent_goes_on(run_project, isolated_home):
    from dispatch.core.results import state_path
    from dispatch.core.settings import get_settings

    get_settings.cache_clear()
    state_file = state_path(get_settings().state_dir, "retrynote")
    seen = isolated_home / "seen"
    seen.mkdir()
    script = ("echo '=== runner: glm: 429, retrying 2/10 in 30s ==='\n"
              + _watch(state_file, "S01-retry", "glm: 429, retrying 2/10", seen / "retrying.json", present=True)
              + "echo 'the agent writes again'\n"
              + _watch(state_file, "S01-retry", "retrying", seen / "after.json", present=False))
    write_spec(isolated_home / "specs" / "retrynote", "S01-retry.md", {"task_id": "S01-retry", "kind": "shell"},
               f"## Goal\nShow a retry.\n\n```bash\n{script}```\n")
    state, summary = run_project("retrynote")
    assert state.is_completed(), state.message
    retrying = json.loads((seen / "retrying.json").read_text())["specs"]["S01-retry"]
    assert (retrying["state"], retrying["reason"]) == ("running", "glm: 429, retrying 2/10")
    after = json.loads((seen / "after.json").read_text())["specs"]["S01-retry"]
    assert (after["state"], after["reason"]) == ("running", "")
    assert (summary.specs["S01-retry"].state, summary.specs["S01-retry"].reason) == ("succeeded", "")


@pytest.mark.parametrize(("line", "shown", "note"), [
    ("=== runner: glm: 429, retrying 2/10 in 30s ===", "", "glm: 429, retrying 2/10"),
    ("=== runner: glm: 429, retrying 3/10 in 1.18s ===", "glm: 429, retrying 2/10", "glm: 429, retrying 3/10"),
    ("=== runner: codex: reconnecting 1/5: stream lost ===", "", "codex: reconnecting 1/5: stream lost"),
    ("=== runner: glm: 429, retrying 2/10 in 30s ===", "glm: 429, retrying 2/10", None),  # no change
    ("=== step claude (attempt 2) ===", "glm: 429, retrying 2/10", ""),
    ("=== acceptance 1/1: test -s hello.txt ===", "glm: 429, retrying 2/10", ""),
    ("I wrote hello.txt", "glm: 429, retrying 2/10", ""),  # the agent's own output: it goes on
    ("=== codex error: Reconnecting... 2/5 ===", "codex: reconnecting 1/5", None),  # the CLI's retry, rendered
    ("=== runner: glm retried by itself for 30s without progress; moving on ===", "glm: 429, retrying 9/10", None),
    ("=== runner: WARNING: processes of group 12 survived SIGKILL ===", "", None),
    ("I wrote hello.txt", "", None),
    ("", "glm: 429, retrying 2/10", None),
])
def test_retry_note_reads_the_runners_lines(line: str, shown: str, note: str | None) -> None:
    assert retry_note(line, shown) == note


def test_a_spec_that_waited_for_a_cool_down_runs_without_the_old_reason(run_project, fake_agents, isolated_home):
    import time

    from dispatch.core.results import state_path
    from dispatch.core.settings import get_settings
    from dispatch.prefect.cooldowns import server_cooldowns

    get_settings.cache_clear()
    state_file = state_path(get_settings().state_dir, "cooled")
    seen = isolated_home / "running.json"
    server_cooldowns().set("claude", time.time() + 3, "429 rate limit", "test@host", kind="transient")
    write_spec(isolated_home / "specs" / "cooled", "S01-after.md", {"task_id": "S01-after", "model": ["claude"]},
               f"## Goal\nWrite.\n\nFAKE: write out.txt ok\n\n## Acceptance criteria\n- [ ] `cp {state_file} {seen}`\n")
    state, summary = run_project("cooled")
    assert state.is_completed(), state.message
    running = json.loads(seen.read_text())["specs"]["S01-after"]
    assert (running["state"], running["reason"]) == ("running", ""), "why it waited is over once it runs"
