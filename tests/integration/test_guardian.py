"""The guardian against real parts: loopback sshd nodes, the session's Prefect server, a notification block
posting to a real webhook receiver on 127.0.0.1, real runners on the nodes.

Cycles are run directly (`run_cycle`), never by waiting for the deployment's schedule.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dispatch.cluster.config import parse_node
from dispatch.cluster.ssh import SSHPool
from dispatch.cluster.transports.ssh import SSHTransport
from dispatch.core.drain import drained_nodes, undrain
from dispatch.core.settings import get_settings
from dispatch.ops.guardian import run_cycle
from dispatch.prefect.drained import drained_store
from dispatch.runner import zipapp

pytestmark = pytest.mark.integration


class Receiver:
    """A real HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def about(self, node: str) -> list[dict]:
        prefix = f"[dispatch guardian] {node}"
        return [r for r in self.received if r.get("subject", "").startswith((f"{prefix}:", f"{prefix} "))]


@pytest.fixture
def webhook(prefect_api, monkeypatch):
    """A CustomWebhookNotificationBlock posting {subject, body} to a live receiver; DISPATCH_ALERT_BLOCK names it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    receiver = Receiver()
    name = f"guardian-{uuid.uuid4().hex[:8]}"
    CustomWebhookNotificationBlock(name="guardian", url=receiver.url,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(name)
    monkeypatch.setenv("DISPATCH_ALERT_BLOCK", f"custom-webhook/{name}")
    get_settings.cache_clear()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()


@pytest.fixture
def guarded(loopback_cluster, prefect_api, isolated_home: Path, monkeypatch):
    """DISPATCH_HOME/nodes.json for the loopback cluster; no guardian state or drained node on the server.

    Every loopback node is this machine, whose load other jobs (a 2-core CI box) drive up: no load limit here."""
    from prefect.variables import Variable

    monkeypatch.setenv("DISPATCH_GUARDIAN_MAX_LOAD", "1000")
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": loopback_cluster.nodes}))
    for variable in ("dispatch_guardian_state", "dispatch_drained"):
        Variable.unset(variable)
    get_settings.cache_clear()
    yield loopback_cluster
    for variable in ("dispatch_guardian_state", "dispatch_drained"):
        Variable.unset(variable)


def _check(report, target: str, name: str):
    found = [c for c in report.checks if c.target == target and c.name == name]
    assert len(found) == 1, f"no single {target} {name} check in {[c.to_json() for c in report.checks]}"
    return found[0]


def test_a_dead_node_alerts_once_is_drained_after_n_cycles_and_recovers_with_one_alert(guarded, webhook):
    cluster = guarded
    settings = get_settings()
    assert settings.guardian_drain_after == 3
    first = run_cycle(settings)
    assert _check(first, "loop2", "reachable").ok is True
    assert webhook.about("loop2") == []
    cluster.kill("loop2")
    try:
        for cycle in (1, 2):
            report = run_cycle(settings)
            reachable = _check(report, "loop2", "reachable")
            assert reachable.status == "FAIL" and "loop2" in reachable.detail
            assert _check(report, "loop2", "disk").status == "NOT RUN"
            assert report.exit_code == 1
            assert "loop2" not in drained_nodes(drained_store(settings)), f"drained after {cycle} cycle(s), before 3"
            assert [a["subject"] for a in webhook.about("loop2")] == ["[dispatch guardian] loop2: reachable failing"], (
                report.alerts_to, report.alert_errors, webhook.received)
        report = run_cycle(settings)
        assert report.drained == ["loop2"]
        assert drained_nodes(drained_store(settings))["loop2"]["by"] == "guardian"
        subjects = [a["subject"] for a in webhook.about("loop2")]
        assert subjects == ["[dispatch guardian] loop2: reachable failing", "[dispatch guardian] loop2 drained"]
        assert "fix taken" in webhook.about("loop2")[0]["body"]
        run_cycle(settings)  # still down: nothing new to tell
        assert len(webhook.about("loop2")) == 2
    finally:
        cluster.restart("loop2")
    report = run_cycle(settings)
    assert _check(report, "loop2", "reachable").ok is True
    assert report.undrained == ["loop2"] and "loop2" not in drained_nodes(drained_store(settings))
    run_cycle(settings)
    recovered = [a for a in webhook.about("loop2") if a["subject"].endswith("recovered")]
    assert len(recovered) == 1 and len(webhook.about("loop2")) == 3
    assert "undrained" in recovered[0]["body"]
    assert webhook.about("loop1") == [] and webhook.about("loop3") == []


def test_a_persons_drain_is_left_alone_and_no_block_means_log_only(guarded):
    from dispatch.core.drain import drain
    from dispatch.prefect.drained import drained_store

    cluster, settings = guarded, get_settings()
    assert settings.alert_block is None
    cluster.kill("loop3")
    try:
        report = run_cycle(settings)
        assert report.alerts_to == "the log only (DISPATCH_ALERT_BLOCK is not set)"
        assert [a.subject for a in report.alerts if a.target == "loop3"] == ["[dispatch guardian] loop3: reachable "
                                                                              "failing"]
        drain(drained_store(settings), "loop3", reason="disk swap on Tuesday", by="alice")
        for _ in range(settings.guardian_drain_after):
            assert run_cycle(settings).drained == []
        cluster.restart("loop3")
        report = run_cycle(settings)
        assert [a.kind for a in report.alerts if a.target == "loop3"] == ["recovered"]
        assert "left drained by alice" in report.alerts[-1].body
        assert report.undrained == [] and drained_nodes(drained_store(settings))["loop3"]["by"] == "alice"
    finally:
        cluster.restart("loop3")
        undrain(drained_store(settings), "loop3")


def _transport(cluster, name: str, pool: SSHPool) -> SSHTransport:
    node = parse_node(cluster.nodes_json, 0, cluster.node(name), get_settings())
    return SSHTransport(node, pool)


def _start_runner(transport: SSHTransport, project: str, task_id: str, seconds: int) -> str:
    """A real detached runner of `project` on the node, running `sleep`; returns its run directory."""
    run_dir = transport.run_dir(project, task_id)
    task = json.dumps({"project": project, "task_id": task_id, "workdir": f"{run_dir}/work", "timeout": 600,
                       "stall_timeout": 600, "heartbeat": 0.5,
                       "steps": [{"name": "shell", "script": f"sleep {seconds}"}]}).encode()
    quoted = shlex.quote(run_dir)
    encoded = base64.b64encode(task).decode()
    transport.pool.run(transport.target, f"mkdir -p {quoted} && printf %s {encoded} | base64 -d > {quoted}/task.json"
                                         f" && {transport.runner()} run {quoted} --detach", timeout=60)
    return run_dir


def _alive(transport: SSHTransport, run_dir: str) -> bool:
    out = transport.pool.run(transport.target, f"{transport.runner()} status {shlex.quote(run_dir)}", timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])["alive"]


def test_an_orphan_runner_is_killed_and_a_watched_one_is_left_running(guarded, isolated_home: Path):
    from dispatch.core.results import ProjectState, save_state

    settings = get_settings()
    save_state(settings.state_dir, ProjectState(project="watched", pid=os.getpid()))  # a live dispatcher
    with SSHPool() as pool:
        transport = _transport(guarded, "loop1", pool)
        orphan = _start_runner(transport, "ghost", "t1", 300)
        watched = _start_runner(transport, "watched", "t1", 300)
        try:
            deadline = time.monotonic() + 20
            while not (_alive(transport, orphan) and _alive(transport, watched)) and time.monotonic() < deadline:
                time.sleep(0.2)
            report = run_cycle(settings)
            orphans = _check(report, "loop1", "orphans")
            assert orphans.status == "REPAIRED", orphans.to_json()
            assert "ghost/t1" in orphans.detail and "watched" not in orphans.detail
            assert not _alive(transport, orphan)
            assert _alive(transport, watched)
            assert _check(run_cycle(settings), "loop1", "orphans").status == "ok"
        finally:
            for run_dir in (orphan, watched):
                pool.run(transport.target, f"{transport.runner()} kill {shlex.quote(run_dir)}", timeout=60, check=False)
            transport.close()


def test_a_tampered_runner_is_reshipped_and_rechecked(guarded):
    settings = get_settings()
    run_cycle(settings)  # the runner is on every node now
    shipped = guarded.run_root("loop3") / ".runner" / zipapp.build().version[:16] / "runner.pyz"
    original = shipped.read_bytes()
    shipped.write_bytes(original + b"\nimport os; os.system('echo owned')\n")
    report = run_cycle(settings)
    runner = _check(report, "loop3", "runner")
    assert runner.ok is False and "tampered" in runner.detail
    assert runner.repair == "re-shipped the runner" and runner.repaired is True and runner.status == "REPAIRED"
    assert shipped.read_bytes() == original
    assert _check(run_cycle(settings), "loop3", "runner").status == "ok"


def test_an_expired_lock_variable_is_deleted(guarded):
    from prefect.variables import Variable

    name = f"dispatch_lock_project-guardian__{uuid.uuid4().hex[:12]}"
    Variable.set(name, {"scope": "project-guardian", "patterns": ["src/**"], "holder": "bob@gone", "project": "g",
                        "task_id": "t1", "run_id": "r", "lease": 0.0, "expires": 0})
    report = run_cycle(get_settings())
    locks = _check(report, "server", "locks")
    assert locks.status == "REPAIRED" and name in locks.detail
    assert Variable.get(name) is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _running_dispatcher(client, project: str):
    """A flow run of the `dispatch-project` flow, Running, as a dispatcher's (no process behind it)."""
    from prefect import flow
    from prefect.states import Running

    @flow(name="dispatch-project")
    def dispatch_project(project: str) -> None:
        pass

    return client.create_flow_run(dispatch_project, parameters={"project": project}, state=Running())


def test_a_flow_run_stuck_running_with_a_dead_dispatcher_is_marked_crashed(guarded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    from dispatch.core.results import ProjectState, save_state

    with get_client(sync_client=True) as client:
        run = _running_dispatcher(client, "stuckproj")
    settings = get_settings()
    save_state(settings.state_dir, ProjectState(project="stuckproj", flow_run_id=str(run.id), pid=_dead_pid()))
    report = run_cycle(settings)
    stuck = _check(report, "server", "stuck-runs")
    assert stuck.status == "REPAIRED" and "stuckproj" in stuck.detail
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state_type == StateType.CRASHED


LEASE_HOLDER = """
import sys, time
from dispatch.prefect.slots import ServerSlots
slots = ServerSlots({"leak": sys.argv[1]}, lease_seconds=3600)
lease = slots.try_acquire("leak").lease_id
from prefect.variables import Variable
from dispatch.prefect.slots import lease_record
deadline = time.monotonic() + 60
while Variable.get(lease_record(lease)) is None and time.monotonic() < deadline:  # written off this thread
    time.sleep(0.05)
print(lease, flush=True)
time.sleep(600)
"""


def test_the_lease_of_a_dispatcher_that_died_is_released(guarded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    limit = f"node-leak{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=2))
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, limit], stdout=subprocess.PIPE, text=True,
                              env=os.environ.copy())
    try:
        lease = holder.stdout.readline().strip()
        assert lease and lease != "None", "the holder took no slot"
    finally:
        holder.kill()  # dies holding the lease (an hour long): nothing releases it by itself
        holder.wait()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
    report = run_cycle(get_settings())
    leases = _check(report, "server", "leases")
    assert leases.status == "REPAIRED" and limit in leases.detail, leases.to_json()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
    assert _check(run_cycle(get_settings()), "server", "leases").status == "ok"


def test_a_live_holders_lease_is_recorded_left_alone_and_its_record_removed_with_it(guarded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.variables import Variable

    from dispatch.prefect.slots import ServerSlots, lease_record

    limit = f"node-live{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=2))
    run_cycle(get_settings())  # leases other tests' dispatchers left on the session server: released now
    slots = ServerSlots({"live": limit}, lease_seconds=600)
    try:
        slot = slots.try_acquire("live")
        lease = slot.lease_id
        deadline = time.monotonic() + 30
        while Variable.get(lease_record(lease)) is None and time.monotonic() < deadline:  # written off the loop
            time.sleep(0.05)
        record = Variable.get(lease_record(lease))
        assert record["limit"] == limit and record["pid"] == os.getpid()
        leases = _check(run_cycle(get_settings()), "server", "leases")
        assert leases.status == "ok", leases.to_json()
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
        slots.release(slot)
    finally:
        slots.close()
    assert Variable.get(lease_record(lease)) is None
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0


def test_released_slots_are_counted_as_releasing_until_the_server_has_them_and_leave_no_record(guarded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.variables import Variable

    from dispatch.prefect.slots import ServerSlots, lease_record

    limit = f"node-rel{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=3))
    slots = ServerSlots({"n": limit}, lease_seconds=600)
    try:
        taken = [slots.try_acquire("n") for _ in range(3)]
        assert None not in taken and slots.try_acquire("n") is None  # the limit is full
        leases = [slot.lease_id for slot in taken]
        for slot in taken:  # at once: some records may not even be written yet
            slots.release(slot)
        with get_client(sync_client=True) as client:
            pending = slots.releasing()  # first: a release that lands meanwhile only lowers what is read next
            active = client.read_global_concurrency_limit_by_name(limit).active_slots
            assert active <= pending, f"the server still counts {active} slots, the run only {pending}"
            deadline = time.monotonic() + 30
            while slots.releasing() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert slots.releasing() == 0
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
        deadline = time.monotonic() + 30
        while any(Variable.get(lease_record(lease)) for lease in leases) and time.monotonic() < deadline:
            time.sleep(0.05)  # records are removed after their releases
        assert [Variable.get(lease_record(lease)) for lease in leases] == [None, None, None]
    finally:
        slots.close()


def test_a_burst_takes_one_lease_of_its_slots_on_the_server_and_gives_its_idle_part_back_only_when_covered(guarded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from dispatch.prefect.slots import ServerSlots

    limit = f"node-burst{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=4))

        def active() -> int:
            return client.read_global_concurrency_limit_by_name(limit).active_slots

        def settles(value: int) -> bool:
            deadline = time.monotonic() + 30
            while active() != value and time.monotonic() < deadline:
                time.sleep(0.05)
            return active() == value

        slots = ServerSlots({"n": limit}, lease_seconds=600, grace=0.2)
        try:
            running, *idle = slots.try_acquire_many("n", 3)
            first = running.lease_id
            assert {slot.lease_id for slot in idle} == {first} and active() == 3  # one lease, three slots
            extra = slots.try_acquire_many("n", 2)  # one slot left: 2 refused (423), then 1
            assert len(extra) == 1 and extra[0].lease_id != first and active() == 4
            for slot in idle:
                slots.park(slot)
            time.sleep(1.0)  # past the grace: the node is full, so the running slot has no smaller lease to go to
            assert running.lease_id == first and active() == 4
            slots.release(extra[0])  # room for it now: it moves, then the three-slot lease goes back
            assert settles(1), active()
            assert running.lease_id not in (None, first) and slots.parked() == {}
            slots.release(running)
            assert settles(0), active()
        finally:
            slots.close()


def _with_a_dead_node(cluster, home: Path) -> None:
    """nodes.json: the loopback nodes plus `gone`, a node whose address has no sshd (connection refused)."""
    gone = {**cluster.node("loop1"), "name": "gone", "host": "127.0.0.9"}
    (home / "nodes.json").write_text(json.dumps({"nodes": [*cluster.nodes, gone]}))


def test_cli_once_json_exits_1_naming_the_failing_check_and_2_for_a_bad_nodes_json(guarded, isolated_home: Path):
    from tests.fixtures.projects import DISPATCH

    home = isolated_home / "home"
    _with_a_dead_node(guarded, home)
    done = subprocess.run([DISPATCH, "guardian", "--once", "--json"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    failing = [(c["target"], c["name"]) for c in report["checks"] if c["status"] == "FAIL"]
    assert failing == [("gone", "reachable")]
    assert {c["target"] for c in report["checks"]} >= {"loop1", "loop2", "loop3", "gone", "server"}
    (home / "nodes.json").write_text(json.dumps({"nodes": [{"name": "x", "slots": "two", "ssh_host": "h"}]}))
    done = subprocess.run([DISPATCH, "guardian", "--once"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "nodes.json" in done.stderr and "slots" in done.stderr


def test_the_flow_writes_its_artifact_and_fails_when_a_check_fails(guarded, isolated_home: Path):
    from prefect.artifacts import Artifact

    from flows.guardian import ARTIFACT_KEY, guardian

    assert guardian(return_state=True).is_completed()
    healthy = Artifact.get(ARTIFACT_KEY)
    assert "| loop1 | reachable | ok |" in healthy.data and "**FAIL**" not in healthy.data
    _with_a_dead_node(guarded, isolated_home / "home")
    state = guardian(return_state=True)
    assert state.is_failed() and "gone reachable FAIL" in state.message
    sick = Artifact.get(ARTIFACT_KEY)
    assert "| gone | reachable | **FAIL** |" in sick.data


def test_prefect_yaml_deploys_the_guardian_every_five_minutes():
    import inspect

    import yaml

    from flows.guardian import guardian

    config = yaml.safe_load((Path(__file__).parents[2] / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"] if d["name"] == "guardian"]
    assert deployment["entrypoint"] == "flows/guardian.py:guardian" and guardian.name == "guardian"
    assert deployment["schedules"] == [{"interval": 300, "active": True}]
    assert set(deployment["parameters"]) <= set(inspect.signature(guardian.fn).parameters)


def test_a_worker_node_is_healthy_only_while_a_worker_of_its_pool_beats(prefect_api, isolated_home: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    name = f"wk{uuid.uuid4().hex[:6]}"
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [
        {"name": name, "slots": 2, "transport": "worker"}]}))
    get_settings.cache_clear()
    report = run_cycle(get_settings(), alert=False)
    [worker] = [c for c in report.checks if c.target == name]  # no ssh_host: its worker is all there is to check
    assert worker.name == "worker" and worker.status == "FAIL" and "dispatch nodes sync" in worker.detail
    assert "NOT RUN (no ssh_host" in worker.repair
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=f"node-{name}", type="process"))
        assert _check(run_cycle(get_settings(), alert=False), name, "worker").status == "FAIL"
        client.send_worker_heartbeat(f"node-{name}", "vm-worker", heartbeat_interval_seconds=30)
        worker = _check(run_cycle(get_settings(), alert=False), name, "worker")
        assert worker.status == "ok" and "1 worker(s)" in worker.detail
        client.delete_work_pool(f"node-{name}")


def test_a_server_that_does_not_answer_is_one_fail_naming_its_url_and_the_nodes_are_still_checked(isolated_home):
    from tests.fixtures.projects import DISPATCH

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "DISPATCH_GUARDIAN_MAX_LOAD": "1000"}
    done = subprocess.run([DISPATCH, "guardian", "--once", "--json"], capture_output=True, text=True, timeout=180,
                          env=env)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    by_name = {(c["target"], c["name"]): c for c in report["checks"]}
    assert by_name[("server", "api")]["status"] == "FAIL"
    assert "http://127.0.0.1:9/api" in by_name[("server", "api")]["detail"]
    assert by_name[("local", "reachable")]["status"] == "ok" and by_name[("local", "orphans")]["status"] == "NOT RUN"
    assert "drain policy and alerts skipped" in report["alert_errors"][0]


def test_restarting_the_worker_of_a_node_without_systemd_is_not_run_with_the_reason(guarded, isolated_home: Path):
    name = f"wk{uuid.uuid4().hex[:6]}"
    entry = {**guarded.node("loop1"), "name": name, "transport": "worker"}
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [entry]}))
    report = run_cycle(get_settings(), alert=False)
    assert _check(report, name, "reachable").ok is True  # probed over SSH like any node
    worker = _check(report, name, "worker")
    assert worker.status == "FAIL" and worker.repaired is None
    assert worker.repair == f"restart prefect-worker@{name}.service over SSH: NOT RUN (no systemd on the node: " \
                            "restart the worker by hand)"


def test_alerts_carry_no_secret_of_the_environment(webhook, monkeypatch):
    from dispatch.ops.guardian.policy import Alert, send_alerts

    secret = "sk-guardian-" + uuid.uuid4().hex
    monkeypatch.setenv("OPS_API_KEY", secret)
    get_settings.cache_clear()
    where, errors = send_alerts(get_settings(), [Alert("loop1", "failure", f"[dispatch guardian] loop1: {secret}",
                                                       f"loop1: reachable FAIL: auth {secret} refused")])
    assert errors == [] and where.startswith("notification block custom-webhook/")
    [received] = webhook.about("loop1")
    assert secret not in json.dumps(received) and "***" in received["body"]


def _heartbeat(client, flow_run_id, seconds_ago: float) -> None:
    """A `prefect.flow-run.heartbeat` event of the flow run, as Prefect's flow engine sends them, `seconds_ago`."""
    from datetime import UTC, datetime, timedelta

    occurred = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()
    client.request("POST", "/events", json=[{
        "id": str(uuid.uuid4()), "occurred": occurred, "event": "prefect.flow-run.heartbeat",
        "resource": {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"}, "related": [], "payload": {}}])


def test_a_run_whose_flow_run_heartbeats_stopped_is_crashed_and_a_beating_one_left_running(guarded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Completed

    from dispatch.ops.guardian.server import _silence

    with get_client(sync_client=True) as client:
        quiet, beating = _running_dispatcher(client, "quietproj"), _running_dispatcher(client, "beatproj")
        _heartbeat(client, quiet.id, 1200)
        _heartbeat(client, beating.id, 1300)  # it beat long ago, and still does: the latest beat counts
        _heartbeat(client, beating.id, 5)
        deadline = time.monotonic() + 30
        while (_silence(client, str(quiet.id)) is None or (_silence(client, str(beating.id)) or 999) > 60) \
                and time.monotonic() < deadline:
            time.sleep(0.3)  # the server stores events a moment after it receives them
    report = run_cycle(get_settings())
    stuck = _check(report, "server", "stuck-runs")
    assert stuck.status == "REPAIRED" and "quietproj" in stuck.detail and "no flow-run heartbeat" in stuck.detail
    assert "beatproj" not in stuck.detail
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(quiet.id).state_type == StateType.CRASHED
        assert client.read_flow_run(beating.id).state_type == StateType.RUNNING
        client.set_flow_run_state(beating.id, Completed(), force=True)


def test_a_missing_alert_block_is_reported_not_raised(prefect_api, monkeypatch):
    from dispatch.ops.guardian.policy import Alert, send_alerts

    monkeypatch.setenv("DISPATCH_ALERT_BLOCK", "custom-webhook/no-such-block")
    get_settings.cache_clear()
    where, errors = send_alerts(get_settings(), [Alert("loop1", "failure", "s", "b")])
    assert where == "notification block custom-webhook/no-such-block"
    assert len(errors) == 1 and "cannot load the notification block custom-webhook/no-such-block" in errors[0]
