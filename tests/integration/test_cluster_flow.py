"""Projects on a cluster of real sshd nodes (127.0.0.2-4, slots 2, 3, 4) with a fake agent CLI.

The nodes are laid out like real ones (a login user each, `remote_root: ~/dispatch`, the stock sftp-server),
so what the specs write on the nodes (timeline, fake-agent log) lives in a directory their users can write.
Judged from what the specs and the fake agent record themselves, and from the process table.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.projects import (
    DISPATCH,
    max_concurrency,
    read_timeline,
    runs_by_node,
    shell_spec,
    start_in_background,
    wait_for_starts,
    write_spec,
)
from tests.fixtures.sshd import agent_bin_for_nodes, trust_repository_on_nodes, writable_by_nodes

pytestmark = [pytest.mark.integration, pytest.mark.prefect]


@pytest.fixture
def cluster(loopback_cluster, isolated_home: Path, node_shared: Path, monkeypatch: pytest.MonkeyPatch):
    """DISPATCH_HOME/nodes.json for the loopback cluster, with the fake agent on every node's PATH; its
    `timeline` and `agent_log` files are writable by every node.

    The session's Prefect server runs on SQLite, which cannot hold concurrency limits (each slot request
    meets "database is locked" and a ~2 s back-off), so node slots are not taken from it here; each node's
    agent still enforces its slots. Team mode's limits are tested on PostgreSQL (test_team_mode.py)."""
    monkeypatch.setenv("DISPATCH_SERVER_SLOTS", "false")
    fakebin = agent_bin_for_nodes(node_shared / "fakebin")
    agent_log, timeline = node_shared / "agent.jsonl", node_shared / "timeline"
    writable_by_nodes(agent_log, timeline)
    nodes = []
    for node in loopback_cluster.nodes:
        nodes.append({**node, "env": {"PATH": f"{fakebin}:/usr/local/bin:/usr/bin:/bin",
                                      "FAKE_AGENT_LOG": str(agent_log)}})
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": nodes}))
    loopback_cluster.agent_log, loopback_cluster.timeline = agent_log, timeline
    loopback_cluster.shared = node_shared
    return loopback_cluster


def _agent_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_specs_spread_over_the_nodes_without_exceeding_any_node(run_project, cluster, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "spread", cluster.timeline
    for i in range(18):
        shell_spec(specs, f"S{i:02d}", timeline, seconds=1.0)
    state, summary = run_project("spread")
    assert state.is_completed(), state.message
    by_node = runs_by_node(timeline)
    slots = {n["name"]: n["slots"] for n in cluster.nodes}
    assert sum(len(v) for v in by_node.values()) == 18
    for node, runs in by_node.items():
        assert max_concurrency(runs) <= slots[node], f"{node} ran more than its {slots[node]} slots"
    assert set(by_node) == set(slots), "every node should get work"
    everything = [r for runs in by_node.values() for r in runs]
    assert max_concurrency(everything) >= 7, "the cluster's 9 slots should mostly be in use"
    assert {row.node for row in summary.specs.values()} == set(slots)


def test_overlapping_modifies_never_run_together_across_nodes(run_project, cluster, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "xlocks", cluster.timeline
    for i in range(4):
        shell_spec(specs, f"S0{i}-shared", timeline, seconds=0.8, modifies=["app/config.yaml"])
    for i in range(4, 8):
        shell_spec(specs, f"S0{i}-free", timeline, seconds=0.8, modifies=[f"free/{i}.txt"])
    state, _ = run_project("xlocks")
    assert state.is_completed(), state.message
    runs = {k: v[0] for k, v in read_timeline(timeline).items()}
    shared = [runs[f"S0{i}-shared"] for i in range(4)]
    assert max_concurrency(shared) == 1
    free = [runs[f"S0{i}-free"] for i in range(4, 8)]
    assert max_concurrency(free) >= 3


def test_quota_message_falls_back_to_the_next_model_and_cools_the_model_for_later_specs(
        run_project, cluster, isolated_home: Path):
    from prefect.variables import Variable

    Variable.unset("dispatch_cooldown_glm")
    specs = isolated_home / "specs" / "limits"
    write_spec(specs, "S01-first.md", {"task_id": "S01-first", "model": ["glm", "minimax", "claude"]},
               "## Goal\nWrite a file.\n\nFAKE: model=glm mode=glm-1308\nFAKE: write out/first.txt done\n")
    write_spec(specs, "S02-second.md", {"task_id": "S02-second", "depends_on": ["S01"], "model": ["glm", "claude"]},
               "## Goal\nWrite another file.\n\nFAKE: write out/second.txt done\n")
    try:
        state, summary = run_project("limits")
        assert state.is_completed(), state.message
        assert summary.specs["S01-first"].model == "minimax"
        assert summary.specs["S02-second"].model == "claude"
        # over SSH too, each attempt brings back what its agent reported (the fake's $0.001 per run, limited or not)
        assert summary.specs["S01-first"].cost_usd == pytest.approx(0.002)
        assert summary.specs["S01-first"].attempts_without_cost == 0
        calls = [(c["model"], c["mode"]) for c in _agent_calls(cluster.agent_log)]
        assert calls[:2] == [("glm", "glm-1308"), ("minimax", "ok")]
        assert calls[2:] == [("claude", "ok")], "glm is on cool-down: the second spec must not try it"
        cooldown = Variable.get("dispatch_cooldown_glm")
        assert cooldown["until"] > time.time() + 60
        code_dir = isolated_home / "projects" / "limits"
        assert (code_dir / "out" / "first.txt").read_text().strip() == "done", "scp mode copies results back"
    finally:
        Variable.unset("dispatch_cooldown_glm")


def test_agent_specs_in_scp_mode_run_once_and_bring_their_work_back(run_project, cluster, isolated_home: Path):
    """On nodes laid out like real ones, an agent spec's first attempt is its only one: the agent works in the
    copy of the project the dispatcher sent, and what it wrote comes back for its dependents."""
    code_dir = isolated_home / "projects" / "scpagents"
    code_dir.mkdir(parents=True)
    (code_dir / "README.md").write_text("the project\n")  # a non-empty project is copied to each spec's node
    specs = isolated_home / "specs" / "scpagents"
    agent = {"model": ["claude"]}
    write_spec(specs, "S01-make.md", {"task_id": "S01-make", **agent},
               "## Goal\nmake\n\nFAKE: write out/made.txt made\n\n## Acceptance criteria\n- [ ] `test -f README.md`\n")
    write_spec(specs, "S02-next.md", {"task_id": "S02-next", "depends_on": ["S01"], **agent},
               "## Goal\nnext\n\nFAKE: write out/next.txt next\n\n"
               "## Acceptance criteria\n- [ ] `test -f out/made.txt`\n")
    write_spec(specs, "S03-side.md", {"task_id": "S03-side", **agent}, "## Goal\nside\n\nFAKE: write side.txt side\n")
    state, summary = run_project("scpagents")
    assert state.is_completed(), state.message
    assert {t: (row.attempts, row.reason) for t, row in summary.specs.items()} == {
        "S01-make": (1, ""), "S02-next": (1, ""), "S03-side": (1, "")}, "an agent spec ran more than once"
    assert len(_agent_calls(cluster.agent_log)) == 3, "each spec's agent is paid for once"
    for rel, text in (("out/made.txt", "made"), ("out/next.txt", "next"), ("side.txt", "side")):
        assert (code_dir / rel).read_text().strip() == text


def test_timeout_and_stall_kill_leave_no_process_behind(run_project, cluster, isolated_home: Path, monkeypatch):
    monkeypatch.setenv("DISPATCH_STALL_TIMEOUT", "2")
    monkeypatch.setenv("DISPATCH_RETRIES", "0")
    marker = f"m{os.getpid()}{int(time.time() * 1000) % 100000}"
    specs = isolated_home / "specs" / "hung"
    write_spec(specs, "S01-hangs.md", {"task_id": "S01-hangs", "executor": "claude", "timeout": "1s"},
               f"## Goal\nHang. {marker}\n\nFAKE: mode=hang\n")
    write_spec(specs, "S02-stalls.md", {"task_id": "S02-stalls", "executor": "claude", "timeout": "60s"},
               f"## Goal\nStall. {marker}\n\nFAKE: mode=stall-after:0.5\n")
    state, summary = run_project("hung")
    assert state.is_failed()
    assert summary.specs["S01-hangs"].state == "failed" and "timeout" in summary.specs["S01-hangs"].reason
    assert summary.specs["S02-stalls"].state == "failed" and "stall" in summary.specs["S02-stalls"].reason
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.returncode == 1, f"processes left behind: {left.stdout}"


def test_a_node_killed_mid_run_costs_only_a_retry_on_another_node(run_project, cluster, isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "dying", cluster.timeline
    for i in range(9):
        shell_spec(specs, f"S{i:02d}", timeline, seconds=4.0, retries=2)
    victim = "loop3"
    import threading

    def kill_when_busy():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if victim in runs_by_node(timeline) or any(
                    line.split()[3:4] == [victim] for line in (timeline.read_text().splitlines()
                                                              if timeline.exists() else [])):
                cluster.kill(victim)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        state, summary = run_project("dying")
    finally:
        killer.join(timeout=5)
        cluster.restart(victim)
    assert state.is_completed(), state.message
    rows = summary.specs
    moved = [t for t, row in rows.items() if row.attempts == 2]
    assert moved, "the specs running on the killed node should have been retried"
    assert all(rows[t].node != victim for t in moved), "a retry after a node fault goes to another node"
    assert all(row.attempts <= 2 for row in rows.values()), "a dead node costs its specs one retry, no more"
    finished = {t for t, runs in read_timeline(timeline).items() if any(end for _, end in runs)}
    assert finished == set(rows), "every spec finished somewhere"


def test_stop_kills_the_projects_agents_on_every_node(prefect_api, cluster, isolated_home: Path):
    marker = f"3{os.getpid()}{int(time.time() * 1000) % 100000}"  # a unique sleep length to find them by
    specs, timeline = isolated_home / "specs" / "remote-stop", cluster.timeline
    for i in range(5):
        shell_spec(specs, f"S0{i}", timeline, seconds=marker)
    log = isolated_home / "run.log"
    run = start_in_background("remote-stop", log)
    wait_for_starts(timeline, 5, log)
    stopped = subprocess.run([DISPATCH, "stop", "remote-stop"], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert run.wait(timeout=60) == 1
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.returncode == 1, f"agents left running on the nodes: {left.stdout}"


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def test_git_mode_makes_a_branch_per_spec_and_collect_reports_a_planted_conflict(run_project, cluster,
                                                                                   isolated_home: Path):
    remote, seed, local = cluster.shared / "remote.git", isolated_home / "seed", isolated_home / "clone"
    _git("init", "-q", "--bare", "--shared=0666", "-b", "main", str(remote))  # every node's user pushes to it
    trust_repository_on_nodes(cluster, remote)
    _git("clone", "-q", str(remote), str(seed))
    (seed / "README.md").write_text("the project\n")
    _git("add", "README.md", cwd=seed)
    _git("commit", "-q", "-m", "start", cwd=seed)
    _git("push", "-q", "origin", "HEAD:main", cwd=seed)
    _git("clone", "-q", str(remote), str(local))
    (isolated_home / "home" / "projects.json").write_text(json.dumps({"gitproj": {
        "sync_mode": "git", "repo_url": str(remote), "repo_local": str(local), "main_branch": "main"}}))
    specs = isolated_home / "specs" / "gitproj"
    agent = {"model": ["claude"]}
    write_spec(specs, "S01-base.md", {"task_id": "S01-base", **agent}, "## Goal\nbase\n\nFAKE: write base.txt base\n")
    write_spec(specs, "S02-uses.md", {"task_id": "S02-uses", "depends_on": ["S01"], **agent},
               "## Goal\nuse base\n\nFAKE: write uses.txt uses\n\n## Acceptance criteria\n- [ ] `test -f base.txt`\n")
    write_spec(specs, "S03-left.md", {"task_id": "S03-left", **agent}, "## Goal\nl\n\nFAKE: write shared.txt left\n")
    write_spec(specs, "S04-right.md", {"task_id": "S04-right", **agent}, "## Goal\nr\n\nFAKE: write shared.txt right\n")
    state, summary = run_project("gitproj")
    assert state.is_completed(), state.message
    assert {row.attempts for row in summary.specs.values()} == {1}, "an agent spec ran more than once"
    heads = _git("ls-remote", "--heads", str(remote))
    for task_id in ("S01-base", "S02-uses", "S03-left", "S04-right"):
        assert f"refs/heads/dispatch/gitproj/{task_id}" in heads
    assert "base.txt" in _git("ls-tree", "--name-only", "-r", "dispatch/gitproj/S02-uses", cwd=remote), \
        "a dependent's branch starts from its dependency's work"
    collected = subprocess.run([DISPATCH, "collect", "gitproj"], capture_output=True, text=True, timeout=120)
    assert collected.returncode == 1, collected.stdout + collected.stderr
    assert "S04-right (shared.txt)" in collected.stderr
    merged = _git("ls-tree", "--name-only", "-r", "dispatch/gitproj/integration", cwd=local)
    assert {"base.txt", "uses.txt", "shared.txt"} <= set(merged.split())
    assert _git("rev-parse", "--abbrev-ref", "HEAD", cwd=local).strip() == "main", "the user's checkout is untouched"


def test_restarted_dispatcher_reattaches_to_specs_still_running_on_the_nodes(prefect_api, cluster,
                                                                             isolated_home: Path):
    specs, timeline = isolated_home / "specs" / "reattach", cluster.timeline
    shell_spec(specs, "S01-first", timeline, seconds=0.2)
    for i in range(2, 6):
        shell_spec(specs, f"S0{i}-long", timeline, seconds=10, depends_on=["S01"])
    shell_spec(specs, "S06-last", timeline, seconds=0.2, depends_on=["S02", "S03", "S04", "S05"])
    shell_spec(specs, "S07-quick", timeline, seconds=1.5, depends_on=["S01"])
    log = isolated_home / "first.log"
    first = start_in_background("reattach", log)
    wait_for_starts(timeline, 6, log)
    os.kill(first.pid, 9)  # the dispatcher dies; the runners on the nodes do not
    first.wait()
    deadline = time.monotonic() + 30  # S07 ends while no dispatcher watches: its result must be taken
    while read_timeline(timeline)["S07-quick"][0][1] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run([DISPATCH, "start", "reattach", "-v"], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"})
    assert second.returncode == 0, second.stdout + second.stderr
    runs = read_timeline(timeline)
    assert {k: len(v) for k, v in runs.items()} == {
        "S01-first": 1, "S02-long": 1, "S03-long": 1, "S04-long": 1, "S05-long": 1, "S06-last": 1,
        "S07-quick": 1}, \
        "no spec may run twice: finished ones are cached or recovered, running ones re-attached\n" + \
        second.stderr[-8000:]
    taken = [line for line in (second.stdout + second.stderr).splitlines() if "already succeeded there" in line]
    assert any("S07-quick" in line for line in taken), second.stderr[-8000:]
    assert runs["S06-last"][0][0] >= max(runs[f"S0{i}-long"][0][1] for i in range(2, 6))


def test_a_node_listed_twice_never_runs_more_than_its_slots(run_project, cluster, isolated_home: Path):
    """A configuration mistake: loop1 (2 slots) appears under two names, so the dispatcher counts 4 slots there.
    The node's own agents count its live runners and refuse past 2; refused specs wait and run later."""
    loop1 = {**cluster.node("loop1"), "slots": 2, "env": {"PATH": "/usr/local/bin:/usr/bin:/bin"}}
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [
        {**loop1, "name": "twice-a"}, {**loop1, "name": "twice-b"}]}))
    specs, timeline = isolated_home / "specs" / "twice", cluster.timeline
    for i in range(6):
        shell_spec(specs, f"S{i:02d}", timeline, seconds=1.5)
    state, summary = run_project("twice")
    assert state.is_completed(), state.message
    runs = [run for runs in runs_by_node(timeline).values() for run in runs]
    assert len(runs) == 6 and max_concurrency(runs) <= 2, runs
    assert {row.attempts for row in summary.specs.values()} == {1}, "a refusal by the node is not an attempt"


def test_stop_and_cleanup_reach_a_node_whose_key_lives_only_in_its_block(prefect_api, cluster, isolated_home: Path):
    """A node with no key_path: its key is in its ClusterNode block. A run reaches it, and so must `dispatch stop`
    (killing the runners a killed dispatcher left) and `dispatch cleanup` (removing its run directories)."""
    home = isolated_home / "home"
    entry = {**json.loads((home / "nodes.json").read_text())["nodes"][1], "name": "keyonly"}
    (home / "nodes.json").write_text(json.dumps({"nodes": [entry]}))
    imported = subprocess.run([DISPATCH, "nodes", "import", "--embed-keys"], capture_output=True, text=True,
                              timeout=120)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    del entry["key_path"]  # from now on the key exists only in the block
    (home / "nodes.json").write_text(json.dumps({"nodes": [entry]}))
    marker = f"4{os.getpid()}{int(time.time() * 1000) % 100000}"
    specs, timeline = isolated_home / "specs" / "keyonly", cluster.timeline
    shell_spec(specs, "S01-long", timeline, seconds=marker)
    log = isolated_home / "run.log"
    run = start_in_background("keyonly", log)
    try:
        wait_for_starts(timeline, 1, log)
    finally:
        os.kill(run.pid, 9)  # the dispatcher dies; its runner on the node does not
        run.wait()
    stopped = subprocess.run([DISPATCH, "stop", "keyonly"], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "1 orphaned runner(s) killed" in stopped.stdout, stopped.stdout + stopped.stderr
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.returncode == 1, f"the spec still runs on the node: {left.stdout}"
    run_dirs = cluster.run_root("loop2") / "keyonly"
    assert run_dirs.is_dir()
    cleaned = subprocess.run([DISPATCH, "cleanup", "keyonly"], capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0 and "not cleaned" not in cleaned.stderr, cleaned.stdout + cleaned.stderr
    assert not run_dirs.exists(), "cleanup did not reach the node"


def test_a_drained_node_gets_no_new_spec_its_running_ones_finish_and_undrain_brings_it_back(
        run_project, cluster, isolated_home: Path, monkeypatch):
    import threading

    from dispatch.cluster.drain_watch import DRAINED_WAIT
    from dispatch.core.drain import drain, undrain
    from dispatch.core.results import load_state
    from dispatch.core.settings import get_settings
    from dispatch.core.watch import Watch, watching
    from dispatch.prefect.drained import drained_store

    monkeypatch.setenv("DISPATCH_DRAIN_REFRESH", "0.2")
    get_settings.cache_clear()
    settings = get_settings()
    undrain(drained_store(settings), "loop2")  # the session server's variable: start from a clean slate
    specs, timeline = isolated_home / "specs" / "draining", cluster.timeline
    for i in range(18):
        shell_spec(specs, f"S{i:02d}", timeline, seconds=2.0)
    shell_spec(specs, "S99", timeline, seconds=0.5, depends_on=["S00"], node="loop2")  # only loop2 can run it
    victim, slots = "loop2", cluster.node("loop2")["slots"]
    seen: dict = {}

    def victim_runs() -> list[tuple[float, float | None]]:
        lines = timeline.read_text().splitlines() if timeline.exists() else []
        starts = {ln.split()[0]: float(ln.split()[2]) for ln in lines if ln.split()[1:2] == ["start"]
                  and ln.split()[3:4] == [victim]}
        ends = {ln.split()[0]: float(ln.split()[2]) for ln in lines if ln.split()[1:2] == ["end"]}
        return [(start, ends.get(task_id)) for task_id, start in starts.items()]

    def operator():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(victim_runs()) < slots:  # every slot of the victim busy
            time.sleep(0.05)
        seen["before"] = victim_runs()
        drain(drained_store(settings), victim, reason="test: taken out of service", by="tester")
        seen["drained_at"] = time.time()
        while time.monotonic() < deadline:  # its specs finish, and S99 says it waits for the drained node
            state = load_state(settings.state_dir, "draining")
            row = state.specs.get("S99") if state else None
            if row is not None and row.reason.startswith(DRAINED_WAIT) and all(
                    end for _, end in victim_runs()):
                seen["reason"] = row.reason
                break
            time.sleep(0.05)
        seen["undrained_at"] = time.time()
        undrain(drained_store(settings), victim)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    events: list[tuple[str, str]] = []  # what the progress view of `dispatch start` is told
    listener = lambda event, task_id, details: events.append((event, details.get("reason", "")))  # noqa: E731
    try:
        with watching(Watch(on_event=listener)):
            state, summary = run_project("draining")
    finally:
        thread.join(timeout=5)
        undrain(drained_store(settings), victim)
    assert state.is_completed(), state.message
    assert len(seen["before"]) == slots
    assert seen.get("reason") == f"{DRAINED_WAIT} ({victim})"
    assert ("waiting", f"node(s) drained ({victim}): 1 ready spec(s) wait for them") in events
    runs = victim_runs()
    during = [start for start, _ in runs if seen["drained_at"] < start < seen["undrained_at"]]
    assert during == [], "no new spec starts on a drained node"
    before = {start for start, _ in seen["before"]}
    assert all(end for start, end in runs if start in before), "the specs running there when drained finish"
    assert all(summary.specs[t].attempts == 1 for t in summary.specs), "draining costs no attempt"
    after = [start for start, _ in runs if start > seen["undrained_at"]]
    assert after, "an undrained node is used again by the running dispatcher"
    assert summary.specs["S99"].node == victim
