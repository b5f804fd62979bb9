"""The `worker` transport on real processes: a Prefect server on PostgreSQL, `dispatch nodes sync` making the
node's pool and its `spec-run/node-<name>` deployment, a real `prefect worker` serving the pool, and the
dispatcher sending specs there as child flow runs; a worker killed mid-run leads to a retry, and its
flow run is not left Running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dispatch.core.results import load_state, read_json
from tests.fixtures.projects import max_concurrency, read_timeline, runs_by_node, shell_spec

if TYPE_CHECKING:
    from tests.fixtures.postgres import TeamServer

pytestmark = pytest.mark.integration
_PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
_DISPATCH = [sys.executable, "-m", "dispatch.cli.main"]


class Worker:
    """A `prefect worker start` on a node pool, with its own DISPATCH_HOME (the node's)."""

    def __init__(self, server: TeamServer, pool: str, home: Path, log: Path) -> None:
        self.server, self.pool, self.home, self.log = server, pool, home, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = self.server.env(DISPATCH_HOME=str(self.home), PREFECT_WORKER_QUERY_SECONDS="1",
                              PREFECT_WORKER_HEARTBEAT_SECONDS="2", PREFECT_LOGGING_LEVEL="INFO")
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*_PREFECT, "worker", "start", "--pool", self.pool, "--type", "process",
                                          "--name", f"test-{self.pool}"], env=env, cwd=self.home, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _cluster(server: TeamServer, tmp_path: Path, project: str, slots: int,
             specs: dict[str, float]) -> tuple[dict, Path, Path]:
    """A dispatcher home with one worker node `w1` and a project of sleeping shell specs, synced."""
    home = tmp_path / "gateway"
    home.mkdir()
    root = tmp_path / "w1-root"
    (home / "nodes.json").write_text(json.dumps({"nodes": [
        {"name": "w1", "transport": "worker", "slots": slots, "remote_root": str(root)}]}))
    timeline = tmp_path / "timeline"
    for task_id, seconds in specs.items():
        shell_spec(tmp_path / "specs" / project, task_id, timeline, seconds=seconds, retries=2)
    env = server.env(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(tmp_path / "specs"), DISPATCH_HEARTBEAT="0.5",
                     DISPATCH_RETRY_DELAY="1", COLUMNS="200")
    _sync(env)  # pool node-w1 (limit = slots) and, on the session's first sync, deployment spec-run/node-w1
    return env, timeline, root


def _sync(env: dict) -> str:
    synced = subprocess.run([*_DISPATCH, "nodes", "sync"], env=env, capture_output=True, text=True, timeout=180)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    return synced.stdout


def _one_spec_running(server: TeamServer, tmp_path: Path, project: str, task_id: str, seconds: float):
    """A 1-slot worker node with its worker, and `dispatch start` of a one-spec project in the background."""
    env, timeline, root = _cluster(server, tmp_path, project, slots=1, specs={task_id: seconds})
    worker = Worker(server, "node-w1", tmp_path / "w1-home", tmp_path / "worker.log")
    worker.start()
    dispatcher = subprocess.Popen([*_DISPATCH, "start", project], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    return env, timeline, root, worker, dispatcher


def _wait_started(timeline: Path, task_id: str, dispatcher: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not read_timeline(timeline).get(task_id):
        assert time.monotonic() < deadline and dispatcher.poll() is None, f"{task_id} never started on the worker"
        time.sleep(0.2)


def _kill_node_processes(home: Path, root: Path) -> int:
    """SIGKILL every process of the node whose DISPATCH_HOME is `home`: worker, flow runs, runners, agents."""
    killed = 0
    for pid in _node_processes(home, root):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def _spec_runs(server: TeamServer) -> list:
    """Every flow run of the `spec-run` flow on the server, oldest first."""
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=['spec-run'])))\n"
            "    print(json.dumps([{'id': str(r.id), 'name': r.name, 'state': r.state_name, 'message': "
            "r.state.message if r.state else '', 'parent': str(r.parent_task_run_id or ''), 'tags': r.tags, "
            "'created': r.created.timestamp()} for r in runs]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=server.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return sorted(json.loads(out.stdout), key=lambda r: r["created"])


def test_specs_run_as_child_flow_runs_within_the_pools_limit(team_server: TeamServer, tmp_path: Path) -> None:
    specs = {f"S{i:02d}": 4.0 for i in range(3)}
    env, timeline, root = _cluster(team_server, tmp_path, "wp", slots=2, specs=specs)
    assert "already match" in _sync(env), "a second sync must change nothing"
    worker = Worker(team_server, "node-w1", tmp_path / "w1-home", tmp_path / "worker.log")
    worker.start()
    try:
        done = subprocess.run([*_DISPATCH, "start", "wp"], env=env, capture_output=True, text=True, timeout=300)
    finally:
        worker.stop()
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{output}\n--- worker log:\n{(tmp_path / 'worker.log').read_text()[-4000:]}"
    state = load_state(tmp_path / "gateway" / "state", "wp")
    assert state.state == "completed" and all(row.node == "w1" for row in state.specs.values()), state.specs

    by_node = runs_by_node(timeline)
    assert set(by_node) == {"w1"} and len(by_node["w1"]) == len(specs)
    assert max_concurrency(by_node["w1"]) <= 2, "more specs at once than the node's 2 slots"
    assert max_concurrency(by_node["w1"]) == 2, "the two slots were never used together"
    # each spec ran on the node, under its run root, as a spec-run flow run that is a child of a task run
    for task_id in specs:
        assert read_json(root / "wp" / "tasks" / task_id / "result.json")["status"] == "succeeded"
    children = [r for r in _spec_runs(team_server) if "project:wp" in r["tags"]]
    assert len(children) == len(specs) and {r["state"] for r in children} == {"Completed"}, children
    assert all(r["parent"] for r in children), "spec-run flow runs must be children of the specs' task runs"
    starts = read_timeline(timeline)
    waits = sorted(starts[t][0][0] - row.dispatched_at for t, row in state.specs.items())
    print(f"\n[worker] dispatched -> spec running on the worker: median {waits[len(waits) // 2]:.1f} s, "
          f"max {waits[-1]:.1f} s")


def test_a_worker_killed_mid_run_is_detected_and_the_spec_retried(team_server: TeamServer, tmp_path: Path) -> None:
    env, timeline, root, worker, dispatcher = _one_spec_running(team_server, tmp_path, "wcrash", "S01-long", 6.0)
    try:
        _wait_started(timeline, "S01-long", dispatcher)
        # the node crashes: the worker, its flow-run process and the spec's runner all die at once
        assert _kill_node_processes(worker.home, root) >= 3, "expected the worker, its flow run and the runner"
        worker.proc.wait()
        killed_at = time.time()
        worker.start()  # systemd brings the worker back (Restart=always)
        output, _ = dispatcher.communicate(timeout=240)
    finally:
        if dispatcher.poll() is None:
            dispatcher.kill()
        worker.stop()
    assert dispatcher.returncode == 0, f"{output}\n--- worker log:\n{(tmp_path / 'worker.log').read_text()[-4000:]}"
    runs = read_timeline(timeline)["S01-long"]
    assert len(runs) == 2 and runs[0][1] is None and runs[1][1] is not None, runs  # killed once, then ran whole
    children = [r for r in _spec_runs(team_server) if "project:wcrash" in r["tags"]]
    assert [r["state"] for r in children] == ["Crashed", "Completed"], children
    assert "no heartbeat" in children[0]["message"], children[0]
    state = load_state(tmp_path / "gateway" / "state", "wcrash")
    assert state.specs["S01-long"].attempts == 2 and state.specs["S01-long"].state == "succeeded", output
    print(f"\n[worker] crash -> retry running again: {runs[1][0] - killed_at:.1f} s")


def test_dispatch_stop_cancels_a_worker_nodes_spec_and_kills_its_processes(team_server: TeamServer,
                                                                           tmp_path: Path) -> None:
    env, timeline, root, worker, dispatcher = _one_spec_running(team_server, tmp_path, "wstop", "S01-endless",
                                                                120.0)
    try:
        _wait_started(timeline, "S01-endless", dispatcher)
        stopped = subprocess.run([*_DISPATCH, "stop", "wstop"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        output, _ = dispatcher.communicate(timeout=60)
        deadline = time.monotonic() + 30  # the worker cancels the flow run; its flow kills the runner
        while left := _node_processes(worker.home, root, "wstop"):
            assert time.monotonic() < deadline, f"spec processes left running: {left}"
            time.sleep(0.5)
    finally:
        if dispatcher.poll() is None:
            dispatcher.kill()
        worker.stop()
    assert dispatcher.returncode == 1, output
    assert read_timeline(timeline)["S01-endless"][0][1] is None, "the spec must have been killed, not finish"
    state = load_state(tmp_path / "gateway" / "state", "wstop")
    assert state.state == "cancelled" and state.specs["S01-endless"].state == "cancelled", state.specs
    children = [r for r in _spec_runs(team_server) if "project:wstop" in r["tags"]]
    assert [r["state"] for r in children] == ["Cancelled"], children


def _node_processes(home: Path, root: Path, project: str | None = None) -> list[int]:
    """Pids of the node's processes, only those working for `project` when given: the worker and its flow runs
    carry DISPATCH_HOME=home; runners and steps (given an allow-list environment) name a run directory under
    the node's run root on their command line or in DISPATCH_RUN_DIR."""
    found = []
    runs = f"{root}/{project or ''}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"DISPATCH_HOME={home}".encode() in environ:
            if project is None or f"DISPATCH_PROJECT={project}".encode() in environ:
                found.append(int(proc.name))
        elif runs in cmdline or any(item.startswith(b"DISPATCH_RUN_DIR=" + runs) for item in environ):
            found.append(int(proc.name))
    return found


def test_a_worker_node_without_worker_or_deployment_raises_node_errors(prefect_api: str) -> None:
    """The failures a worker node reports are `NodeError`s naming the node and the fix (a TypeError before)."""
    from dispatch.core.errors import NodeError
    from dispatch.core.nodes import Node
    from dispatch.prefect.worker_transport import FlowRunWatcher, WorkerTransport

    watcher = FlowRunWatcher()
    try:
        transport = WorkerTransport(Node(name="wnobody", slots=1, transport="worker"), watcher)
        with pytest.raises(NodeError, match="no work pool node-wnobody on the server: run `dispatch nodes sync`") \
                as down:
            transport.probe()
        assert down.value.node == "wnobody"
        with pytest.raises(NodeError, match="worker node: the gateway runs no commands on it"):
            transport.exec("true", timeout=5)
        with pytest.raises(NodeError, match=r"no deployment spec-run/node-wnobody .*`dispatch nodes sync`"):
            transport.adoptable_runs("some-project")
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:  # a pool without a worker: the node is down until one sends heartbeats
            watcher.client.create_work_pool(WorkPoolCreate(name="node-wlonely", type="process"))
        except ObjectAlreadyExists:
            pass
        lonely = WorkerTransport(Node(name="wlonely", slots=1, transport="worker"), watcher)
        with pytest.raises(NodeError, match="no live Prefect worker on pool node-wlonely: start it on the node"):
            lonely.probe()
    finally:
        watcher.close()


def test_a_missing_spec_run_deployment_fails_over_to_another_node(run_project, isolated_home: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A worker node whose `spec-run` deployment was never made is taken out, named, and its specs run elsewhere."""
    import logging

    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [
        {"name": "wmissing", "transport": "worker", "slots": 4, "priority": 0},
        {"name": "local", "transport": "local", "slots": 1, "priority": 1}]}))
    timeline = isolated_home / "timeline"
    shell_spec(isolated_home / "specs" / "failover", "S01", timeline, seconds=0.1)
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(caplog.handler)
    try:
        state, summary = run_project("failover", slots=1)
    finally:
        flow_logger.removeHandler(caplog.handler)
    assert state.is_completed(), state.message
    assert summary.specs["S01"].node == "local" and summary.specs["S01"].state == "succeeded"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("wmissing" in w and "no deployment spec-run/node-wmissing" in w and "dispatch nodes sync" in w
               for w in warnings), warnings
