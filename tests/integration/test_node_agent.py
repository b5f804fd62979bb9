"""The node agent (`runner.pyz serve`) behind the SSH transport, on a real sshd node.

Judged from what the specs record themselves and from the node's process table.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dispatch.cluster.config import parse_node
from dispatch.cluster.ssh import SSHPool
from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.ssh import SSHTransport
from dispatch.core.errors import NodeError
from dispatch.core.settings import get_settings
from dispatch.runner.procs import RUNNER_PROCESS_NAME

pytestmark = pytest.mark.integration


@pytest.fixture
def transport(loopback_cluster, ssh_pool: SSHPool):
    # 8 slots: these tests send up to 6 attempts at once, and the node's agent holds it to its slots
    raw = {**loopback_cluster.node("loop1"), "slots": 8}
    node = parse_node(loopback_cluster.nodes_json, 0, raw, get_settings())
    made = SSHTransport(node, ssh_pool)
    made.local_root = loopback_cluster.run_root("loop1")  # the node's run root, seen from this machine
    yield made
    made.close()


def _request(transport: SSHTransport, task_id: str, script: str, key: str = "k1", project: str = "agent") -> RunRequest:
    run_dir = transport.run_dir(project, task_id)
    return RunRequest(project=project, task_id=task_id, node=transport.node.name, cache_key=key, run_id="r1",
                      workdir=f"{run_dir}/work", steps=[{"name": "shell", "script": script}], timeout=60,
                      stall_timeout=30)


def _processes(marker: str, transport: SSHTransport) -> list[tuple[int, str]]:
    """(pid, command line) of the node's processes (its user's, under its root) whose command line has `marker`."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                owner = os.stat(entry.path).st_uid
            except OSError:
                continue
            if marker in cmd and f"{transport.root}/.runner/" in cmd and owner == transport.local_root.stat().st_uid:
                found.append((int(entry.name), cmd))
    return found


def _serving(transport: SSHTransport) -> list[int]:
    """The node's agents: the runners they fork share their command line (renamed once started; a fork still
    starting has an agent or a fork for its parent)."""
    found = {pid for pid, _ in _processes("runner.pyz serve", transport)}
    agents = []
    for pid in found:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if name != RUNNER_PROCESS_NAME.decode() and parent not in found:
            agents.append(pid)
    return sorted(agents)


def test_concurrent_attempts_share_one_agent_and_get_their_own_logs(transport: SSHTransport, node_shared: Path):
    marks = node_shared / "marks"
    secret = "s3cr3t-agent-key"
    results, lines = {}, {f"A{i}": [] for i in range(6)}

    def attempt(task_id: str) -> None:
        # a shell step is given no secret ("[$API_KEY]" stays empty); one it prints anyway is masked
        script = (f'echo "start {task_id}"; echo "[$API_KEY]"; printf "key %s%s\\n" s3cr3t -agent-key; sleep 1; '
                  f'echo {task_id} >> {marks}; echo "end {task_id}"')
        results[task_id] = transport.run(_request(transport, task_id, script), lines[task_id].append,
                                         secrets={"API_KEY": secret})

    threads = [threading.Thread(target=attempt, args=(t,)) for t in lines]
    for thread in threads:
        thread.start()
    serving: set[int] = set()  # every agent seen on the node while the attempts ran (however slow its start)
    followers: set[str] = set()
    deadline = time.monotonic() + 60
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
        serving.update(_serving(transport))
        followers.update(cmd for _, cmd in _processes("runner.pyz follow", transport))
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=60)
    assert all(result.succeeded for result in results.values()), {t: r.reason for t, r in results.items()}
    assert len(serving) == 1, f"expected one agent on the node, found {sorted(serving)}"
    assert not followers, "attempts went the long way (one follow process each) instead of through the agent"
    assert sorted(marks.read_text().split()) == sorted(lines)
    for task_id, got in lines.items():
        assert f"start {task_id}" in got and f"end {task_id}" in got, got
        assert not any(other in line for line in got for other in lines if other != task_id), got
        assert "key ***" in got and "[]" in got and not any(secret in line for line in got)
        run_dir = transport.local_root / "agent" / "tasks" / task_id
        assert secret not in (run_dir / "task.json").read_text()


def test_a_killed_agent_loses_no_attempt_and_the_next_one_starts_a_new_agent(transport: SSHTransport,
                                                                           node_shared: Path):
    marks = node_shared / "marks"
    result, lines = {}, []
    script = f"echo begin; sleep 2; echo once >> {marks}; echo done"
    worker = threading.Thread(target=lambda: result.setdefault(
        "r", transport.run(_request(transport, "K1", script), lines.append)))
    worker.start()
    deadline = time.monotonic() + 20
    while "begin" not in lines and time.monotonic() < deadline:
        time.sleep(0.05)
    agents = _serving(transport)
    assert len(agents) == 1, agents
    os.kill(agents[0], signal.SIGKILL)
    worker.join(timeout=60)
    assert result["r"].succeeded, result["r"].reason
    assert marks.read_text().split() == ["once"], "the spec ran again after its agent died"
    assert any("re-attached to the running attempt" in line for line in lines), lines
    assert "done" in lines
    again = transport.run(_request(transport, "K2", "echo second"), lambda line: None)
    assert again.succeeded, again.reason
    assert len(_serving(transport)) == 1 and _serving(transport) != agents


def test_a_finished_attempt_is_recovered_not_rerun_and_an_edited_one_runs_again(transport: SSHTransport,
                                                                              node_shared: Path):
    counter = node_shared / "count"
    script = f"echo x >> {counter}"
    first = transport.run(_request(transport, "R1", script, key="same"), lambda line: None)
    assert first.succeeded, first.reason
    lines: list[str] = []
    second = transport.run(_request(transport, "R1", script, key="same"), lines.append)
    assert second.succeeded and len(counter.read_text().split()) == 1
    assert any("recovered the result" in line for line in lines), lines
    edited = transport.run(_request(transport, "R1", script, key="edited"), lambda line: None)
    assert edited.succeeded and len(counter.read_text().split()) == 2
    forced = _request(transport, "R1", script, key="edited")
    forced.fresh = True  # dispatch start --force: the same attempt's result on the node is not taken back
    assert transport.run(forced, lambda line: None).succeeded and len(counter.read_text().split()) == 3


def test_a_bad_task_fails_that_attempt_only(transport: SSHTransport):
    bad = _request(transport, "B1", "true")
    bad.steps = [{"name": "shell"}]  # neither argv nor script
    failed = transport.run(bad, lambda line: None)
    assert not failed.succeeded and "steps[0]" in failed.reason, failed.reason
    good = transport.run(_request(transport, "B2", "echo fine"), lambda line: None)
    assert good.succeeded, good.reason
    status = json.loads((transport.local_root / "agent" / "tasks" / "B2" / "status.json").read_text())
    assert status["state"] == "succeeded"


def test_a_runner_that_dies_setting_up_says_why_and_the_agent_goes_on(transport: SSHTransport):
    # the agent forks a runner and reports it started at once; a runner that then cannot write its status
    # (here a directory stands where status.json goes) must come back as a clear error, not a missing result
    first = transport.run(_request(transport, "E0", "echo fine"), lambda line: None)
    assert first.succeeded, first.reason
    run_dir = transport.local_root / "agent" / "tasks" / "E1"
    (run_dir / "status.json").mkdir(parents=True)
    owner = transport.local_root.stat()
    for path in (run_dir, run_dir / "status.json"):
        os.chown(path, owner.st_uid, owner.st_gid)
    failed = transport.run(_request(transport, "E1", "echo never"), lambda line: None)
    assert not failed.succeeded
    assert "the detached runner did not start" in failed.reason and "IsADirectoryError" in failed.reason, failed.reason
    assert "Traceback" not in failed.reason, failed.reason  # the error, not the whole stack
    good = transport.run(_request(transport, "E2", "echo fine"), lambda line: None)
    assert good.succeeded, good.reason


def test_a_chatty_spec_streams_every_line_in_order(transport: SSHTransport):
    """More log than one agent read (1 MiB) arrives whole and in order, long lines included."""
    script = ("for i in $(seq 1 30000); do echo \"line $i $(printf '%060d' $i)\"; done; "
              "head -c 1500000 /dev/zero | tr '\\0' x; echo")
    lines: list[str] = []
    result = transport.run(_request(transport, "C1", script), lines.append)
    assert result.succeeded, result.reason
    numbered = [line for line in lines if line.startswith("line ")]
    assert numbered == [f"line {i} {i:060d}" for i in range(1, 30001)]
    assert sum(len(line) for line in lines if set(line) == {"x"}) == 1_500_000


def test_a_relative_workdir_is_the_same_directory_for_the_runner_sftp_and_commands(transport: SSHTransport,
                                                                                  ssh_pool: SSHPool):
    """On a node, a relative path starts at the login's home, whoever resolves it (the run root is ~/dispatch)."""
    request = _request(transport, "W1", "pwd; echo made > made.txt")
    assert not request.workdir.startswith("/"), "the loopback node should have a home-relative run root"
    lines: list[str] = []
    result = transport.run(request, lines.append)
    assert result.succeeded, result.reason
    expected = transport.local_root / "agent" / "tasks" / "W1" / "work"
    assert str(expected) in lines, lines
    assert result.files_changed == ["made.txt"]
    # what the dispatcher reads back over SFTP and SSH, with the same relative path
    assert ssh_pool.read_file(transport.target, f"{request.workdir}/made.txt") == b"made\n"
    assert not (transport.local_root / "agent" / "tasks" / "W1" / transport.root).exists(), \
        "the runner made a nested copy of the run root inside the run directory"


def _with_marker(marker: str) -> list[int]:
    """Pids of live processes (any user) whose command line holds `marker`."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(entry.path, "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                found.append(int(entry.name))
    return found


def test_detached_descendants_are_killed_and_reported_when_the_attempt_ends(transport: SSHTransport):
    """A step that double-forks a `sleep 300` into its own session (as dev servers do) and exits 0: the runner, a
    child subreaper, gets the orphans back, kills them and says so; nothing of them is left on the node."""
    quiet, loud = (f"300.{os.getpid()}{n}{time.time_ns() % 1000:03d}" for n in (1, 2))
    script = (f"(setsid sleep {quiet} </dev/null >/dev/null 2>&1 &)\n"  # detached, its output elsewhere
              f"(setsid sleep {loud} &)\n"  # detached, still holding the step's output
              "echo spawned")
    lines: list[str] = []
    try:
        result = transport.run(_request(transport, "D1", script), lines.append)
        assert result.succeeded, result.reason
        assert "killed 2 leftover processes:" in result.reason, result.reason
        assert f"sleep {quiet}" in result.reason and f"sleep {loud}" in result.reason, result.reason
        assert any("killed 2 leftover processes:" in line for line in lines), lines
        assert _with_marker(quiet) == [] and _with_marker(loud) == [], "a detached descendant outlived its attempt"
    finally:
        for pid in _with_marker(quiet) + _with_marker(loud):
            os.kill(pid, signal.SIGKILL)


def test_the_node_agent_never_runs_more_runners_than_the_nodes_slots(loopback_cluster, node_shared: Path):
    """Two dispatchers that do not share a slot count (two pools, two agents) send 3 attempts each to a 2-slot
    node: the node's agents count the live runners under the run root and answer "node full" past 2."""
    from tests.fixtures.projects import max_concurrency, read_timeline
    from tests.fixtures.sshd import writable_by_nodes

    timeline = node_shared / "timeline"
    writable_by_nodes(timeline)
    raw = {**loopback_cluster.node("loop1"), "slots": 2}
    node = parse_node(loopback_cluster.nodes_json, 0, raw, get_settings())
    results: dict[str, object] = {}
    with SSHPool() as first, SSHPool() as second:
        transports = [SSHTransport(node, first), SSHTransport(node, second)]

        def attempt(index: int) -> None:
            transport, task_id = transports[index % 2], f"F{index}"
            script = (f'echo "{task_id} start $(date +%s.%N)" >> {timeline}; sleep 2; '
                      f'echo "{task_id} end $(date +%s.%N)" >> {timeline}')
            results[task_id] = transport.run(_request(transport, task_id, script, project="full"), lambda _: None)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for transport in transports:
            transport.close()
    ran = read_timeline(timeline)
    assert max_concurrency([run for runs in ran.values() for run in runs]) <= 2, ran
    full = {t: r for t, r in results.items() if r.status == "node_full"}
    assert len(full) >= 2 and all("node full" in r.reason and "2 of 2" in r.reason for r in full.values()), results
    assert all(r.succeeded for t, r in results.items() if t not in full), results
    assert set(ran) == set(results) - set(full), "a refused attempt must not have started"


def test_the_node_agent_refuses_a_run_directory_outside_its_root(transport: SSHTransport):
    escaping = _request(transport, "E1", "echo escaped > escaped.txt")
    for run_dir in ("/tmp/elsewhere", f"{transport.root}/../outside", f"{transport.root}"):
        with pytest.raises(NodeError, match="outside the agent's run root"):
            transport.agent.run(run_dir, escaping.task_json(), None, lambda _: None, timeout=30)
    assert not (transport.local_root.parent / "outside").exists()


def test_a_late_success_with_long_acceptance_is_waited_for_not_lost(transport: SSHTransport, monkeypatch):
    """Acceptance commands run outside the attempt's deadline (each has its own): the wait for the result
    counts them, so a spec whose acceptance outlasts `timeout` + the grace is not reported lost (and run twice)."""
    import dispatch.cluster.transports.ssh as ssh_transport

    monkeypatch.setattr(ssh_transport, "_FOLLOW_GRACE", 1.0)
    request = _request(transport, "LATE", "echo changed > late.txt").model_copy(
        update={"timeout": 2.0, "acceptance": ["sleep 5 && test -f late.txt"]})
    lines: list[str] = []

    result = transport.run(request, lines.append)

    assert result.status == "succeeded", (result.status, result.reason, lines[-5:])


def test_an_attempt_is_recovered_only_by_its_own_cache_key_not_one_that_contains_it(transport: SSHTransport):
    done = transport.run(_request(transport, "KEYS", "true", key="k1-edited"), lambda line: None)
    assert done.status == "succeeded"
    run_dir = transport.run_dir("agent", "KEYS")

    def asked(key: str) -> dict | None:  # what the agent finds there for this attempt, starting nothing
        return transport.agent.run(run_dir, _request(transport, "KEYS", "true", key=key).task_json(), None,
                                   lambda line: None, timeout=30, start=False)

    assert asked("k1") is None, "k1 is another attempt than k1-edited: its result must not be taken for k1's"
    assert isinstance(asked("k1-edited"), dict)
