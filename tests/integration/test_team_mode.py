"""Team mode on real processes: a Prefect server on PostgreSQL with API auth, `prefect deploy` from the repo
root, a real `prefect worker` serving a pool, the demo run as a deployment; wrong auth and an unreachable
server refused with clear messages; the server restarted mid-run loses no finished spec.

The session's SQLite test server (tests/conftest.py) sets PREFECT_API_URL for the whole session, so every
subprocess here gets its PREFECT_API_URL, PREFECT_HOME and auth from `TeamServer.env()` explicitly.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dispatch.core.results import load_state

if TYPE_CHECKING:
    from tests.fixtures.postgres import TeamServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
POOL = "dispatch-gateway"  # prefect.yaml's gateway pool
_PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]


def _run(argv: list[str], env: dict[str, str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def _dispatch_server(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`dispatch server <args>` (the sub-app directly, so this works before and after the lead mounts it)."""
    code = "from dispatch.cli.server import server_app; server_app(prog_name='dispatch server')"
    return _run([sys.executable, "-c", code, *args], {**env, "COLUMNS": "250"}, timeout=30)


def _worker_env(server: TeamServer, home: Path) -> dict[str, str]:
    env = server.env(DISPATCH_HOME=str(home), DISPATCH_LOCAL_SLOTS="3", PREFECT_WORKER_QUERY_SECONDS="1",
                     PREFECT_WORKER_HEARTBEAT_SECONDS="5", PREFECT_LOGGING_LEVEL="INFO")
    env.pop("DISPATCH_SPECS", None)  # the bundled demo project
    return env


def deploy_from_repo(env: dict[str, str]) -> None:
    """`prefect work-pool create dispatch-gateway` (if missing) and `prefect deploy --all` from the repo root."""
    created = _run([*_PREFECT, "work-pool", "create", POOL, "--type", "process"], env)
    assert created.returncode == 0 or "already exists" in created.stdout + created.stderr, created.stderr
    deployed = _run([*_PREFECT, "deploy", "--all"], env, cwd=REPO, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr


@contextmanager
def gateway_worker(env: dict[str, str], log_path: Path, cwd: Path) -> Iterator[subprocess.Popen]:
    """A process worker on the gateway pool for the `with` block, its output in `log_path`."""
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([*_PREFECT, "worker", "start", "--pool", POOL, "--type", "process"], env=env,
                                  cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_deploy_and_run_demo_on_a_worker(team_server: TeamServer, tmp_path: Path) -> None:
    env = team_server.env()
    deploy_from_repo(env)

    home = tmp_path / "worker-home"
    log_path = tmp_path / "worker.log"
    with gateway_worker(_worker_env(team_server, home), log_path, tmp_path):
        submitted = time.time()
        ran = _run([*_PREFECT, "deployment", "run", "dispatch-project/dispatch-project", "--param", "project=demo",
                    "--watch", "--watch-timeout", "240"], env, timeout=260)
        output = ran.stdout + ran.stderr
        worker_log = log_path.read_text(errors="replace")[-4000:]
        assert ran.returncode == 0, f"{output}\n--- worker log:\n{worker_log}"
        assert "Completed" in output, output

    state = load_state(home / "state", "demo")
    assert state is not None and state.state == "completed", state
    assert state.api_url == team_server.url
    assert all(row.state == "succeeded" for row in state.specs.values()), state.specs
    first = min(row.started_at for row in state.specs.values() if row.started_at)
    print(f"\n[team-mode] deployment run -> first spec running on the worker: {first - submitted:.1f} s")


def test_the_pipeline_deployment_runs_the_example_on_a_worker(team_server: TeamServer, tmp_path: Path) -> None:
    """`prefect deployment run 'pipeline/pipeline'` works against the team's server with a worker (L3 only)."""
    from dispatch.pipeline.runs import latest_run

    env = team_server.env()
    deploy_from_repo(env)
    home = tmp_path / "worker-home"
    with gateway_worker(_worker_env(team_server, home), tmp_path / "worker.log", tmp_path):
        ran = _run([*_PREFECT, "deployment", "run", "pipeline/pipeline", "--param", "project=shop",
                    "--param", "from_layer=L3", "--param", "to_layer=L3", "--watch", "--watch-timeout", "240"],
                   env, timeout=260)
        output = ran.stdout + ran.stderr
        worker_log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
    assert ran.returncode == 0 and "Completed" in output, f"{output}\n--- worker log:\n{worker_log}"
    record = latest_run(home / "pipeline" / "shop")
    assert record is not None and record.state == "passed", record
    assert Path(record.code_dir) == home / "workspaces" / "shop", "a bundled example is built on a copy"
    assert [(row.layer, row.status) for row in record.layers if row.counted] == [("L3", "PASS")], record.layers


def test_wrong_auth_is_refused(team_server: TeamServer) -> None:
    request = urllib.request.Request(f"{team_server.url}/admin/version", headers={
        "Authorization": "Basic " + b64encode(b"team:wrong").decode()})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

    wrong = _dispatch_server(["check"], team_server.env(PREFECT_API_AUTH_STRING="team:wrong"))
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "refused" in wrong.stderr and "401" in wrong.stderr and team_server.url in wrong.stderr
    assert "team:wrong" not in wrong.stdout + wrong.stderr  # never print a secret

    missing = team_server.env()
    missing.pop("PREFECT_API_AUTH_STRING")
    none = _dispatch_server(["check"], missing)
    assert none.returncode == 2 and "PREFECT_API_AUTH_STRING" in none.stderr, none.stderr

    ok = _dispatch_server(["check"], team_server.env())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok" in ok.stdout and "3.9" in ok.stdout


def test_unreachable_server_names_the_url(team_server: TeamServer) -> None:
    from dispatch.core.net import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    result = _dispatch_server(["check"], team_server.env(PREFECT_API_URL=url))
    assert result.returncode == 2
    assert "cannot reach" in result.stderr and url in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


_SLOW_SPECS = {
    "S01-first.md": ("[]", "echo one > one.txt"),
    "S02-slow.md": ("[S01]", "sleep 12; echo two > two.txt"),
    "S03-last.md": ("[S02]", "echo three > three.txt"),
}


def test_server_restart_mid_run_reruns_no_finished_spec(team_server: TeamServer, tmp_path: Path) -> None:
    specs = tmp_path / "specs" / "slow"
    specs.mkdir(parents=True, exist_ok=True)
    for name, (deps, script) in _SLOW_SPECS.items():
        (specs / name).write_text(f"---\nkind: shell\ndepends_on: {deps}\nretries: 1\n---\n## Goal\n{name}\n\n"
                                  f"```bash\n{script}\n```\n", encoding="utf-8")
    home = tmp_path / "team-home"
    env = team_server.env(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(tmp_path / "specs"),
                          DISPATCH_LOCAL_SLOTS="2")
    dispatch = [sys.executable, "-m", "dispatch.cli.main", "start", "slow"]
    first = subprocess.Popen(dispatch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = load_state(home / "state", "slow")
            if state and state.specs["S02-slow"].state == "running":
                break
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.3)
        else:
            pytest.fail("S02 never started")
        restarted = time.monotonic()
        team_server.restart()
        print(f"\n[team-mode] server restart took {time.monotonic() - restarted:.1f} s")
        output, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    before = load_state(home / "state", "slow")
    finished = {t for t, row in before.specs.items() if row.state == "succeeded"}
    assert "S01-first" in finished, output

    again = _run(dispatch, env, timeout=180)
    after = load_state(home / "state", "slow")
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(row.state == "succeeded" for row in after.specs.values()), after.specs
    rerun = {t for t in finished if not after.specs[t].cached}
    assert not rerun, f"finished before the restart but re-run: {rerun}\nfirst run:\n{output}"


def test_two_users_share_the_nodes_slots_through_the_server(team_server: TeamServer, loopback_cluster,
                                                            tmp_path: Path, node_shared: Path) -> None:
    """Two dispatchers with their own DISPATCH_HOMEs (two users) never put more than a node's slots on it."""
    from tests.fixtures.projects import max_concurrency, runs_by_node, shell_spec
    from tests.fixtures.sshd import writable_by_nodes

    timeline = node_shared / "timeline"
    writable_by_nodes(timeline)
    homes = {}
    for user in ("alice", "bob"):
        home = tmp_path / user / "home"
        home.mkdir(parents=True)
        (home / "nodes.json").write_text(loopback_cluster.nodes_json.read_text())
        for i in range(12):
            shell_spec(tmp_path / user / "specs" / f"{user}-proj", f"S{i:02d}-{user}", timeline, seconds=1.5)
        homes[user] = team_server.env(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(tmp_path / user / "specs"),
                                      DISPATCH_PROJECTS=str(tmp_path / user / "projects"))
    synced = _run([sys.executable, "-m", "dispatch.cli.main", "nodes", "sync"], homes["alice"], timeout=180)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    runs = [subprocess.Popen([sys.executable, "-m", "dispatch.cli.main", "start", f"{user}-proj"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for user, env in homes.items()]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(outputs)
    slots = {n["name"]: n["slots"] for n in loopback_cluster.nodes}
    by_node = runs_by_node(timeline)
    assert sum(len(v) for v in by_node.values()) == 24
    for node, intervals in by_node.items():
        assert max_concurrency(intervals) <= slots[node], f"{node}: more than {slots[node]} specs at once"
    everything = [r for intervals in by_node.values() for r in intervals]
    assert max_concurrency(everything) >= 6, "the two projects should fill most of the 9 slots"


def _limit(server: TeamServer, name: str) -> dict | None:
    """The global concurrency limit `name` on the team server, as JSON (None when missing)."""
    code = ("import json, sys\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.exceptions import ObjectNotFound\n"
            "with get_client(sync_client=True) as c:\n"
            "    try:\n"
            f"        limit = c.read_global_concurrency_limit_by_name({name!r})\n"
            "    except ObjectNotFound:\n"
            "        print('null'); sys.exit(0)\n"
            "    print(json.dumps({'limit': limit.limit, 'active': limit.active}))\n")
    out = _run([sys.executable, "-c", code], server.env(), timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout)


def test_two_users_without_nodes_sync_never_overfill_a_node(team_server: TeamServer, loopback_cluster,
                                                            tmp_path: Path, node_shared: Path) -> None:
    """Nobody ran `dispatch nodes sync`: the first `dispatch start` makes the node's limit from its slots (and
    says so), so two users' dispatchers still share one count and never run more than 2 specs on a 2-slot node."""
    import json
    import uuid

    from tests.fixtures.projects import max_concurrency, runs_by_node, shell_spec
    from tests.fixtures.sshd import writable_by_nodes

    name = f"pair{uuid.uuid4().hex[:8]}"  # a node no test has synced: its limit node-<name> does not exist
    assert _limit(team_server, f"node-{name}") is None
    timeline = node_shared / "timeline"
    writable_by_nodes(timeline)
    node = {**loopback_cluster.node("loop1"), "name": name, "slots": 2}
    envs = {}
    for user in ("carol", "dave"):
        home = tmp_path / user / "home"
        home.mkdir(parents=True)
        (home / "nodes.json").write_text(json.dumps({"nodes": [node]}))
        for i in range(4):
            shell_spec(tmp_path / user / "specs" / f"{user}-proj", f"S{i:02d}-{user}", timeline, seconds=1.5)
        envs[user] = team_server.env(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(tmp_path / user / "specs"),
                                     DISPATCH_PROJECTS=str(tmp_path / user / "projects"))
    runs = [subprocess.Popen([sys.executable, "-m", "dispatch.cli.main", "start", f"{user}-proj"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for user, env in envs.items()]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(outputs)
    intervals = runs_by_node(timeline)[name]
    assert len(intervals) == 8 and max_concurrency(intervals) <= 2, intervals
    assert _limit(team_server, f"node-{name}") == {"limit": 2, "active": True}
    assert any("created it with limit 2" in out and f"node-{name}" in out for out in outputs), "\n".join(outputs)


def test_an_inactive_node_limit_is_refused_with_the_command_to_enable_it(prefect_api: str) -> None:
    """An inactive `node-<name>` limit would not be enforced: the dispatcher refuses to place on it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    from dispatch.cluster.runtime import ClusterRuntime
    from dispatch.core.errors import ConfigError
    from dispatch.core.nodes import Node
    from dispatch.core.settings import get_settings

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="node-asleep", limit=2,
                                                                                active=False))
        except ObjectAlreadyExists:
            pass
    node = Node(name="asleep", slots=2, transport="ssh", host="127.0.0.2")
    with pytest.raises(ConfigError, match="prefect global-concurrency-limit enable node-asleep"):
        ClusterRuntime(get_settings(), [node])


def test_a_server_that_does_not_answer_a_slot_request_delays_the_spec_instead_of_crashing_the_run(
        prefect_api: str) -> None:
    """The dispatch loop asks the server for a node slot; an unreachable server means "not now" (the spec is
    requeued), never an exception out of the loop and never a placement without the shared count."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dispatch.core.net import free_port
    from dispatch.prefect.slots import ServerSlots

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        slots = ServerSlots({"gone": "node-gone"})
        try:
            assert slots.try_acquire("gone") is None
        finally:
            slots.close()


def test_a_small_project_of_another_user_gets_its_share_through_the_server(team_server: TeamServer,
                                                                           loopback_cluster, tmp_path: Path,
                                                                           node_shared: Path) -> None:
    """Fair share in team mode: two users on two homes (two machines), one server. Bob's 5 specs, started while
    Alice's 90 fill the 9 slots, all run while Alice still has most of her work left (judged by order of starts)."""
    from tests.fixtures.projects import read_timeline, shell_spec, wait_for_starts
    from tests.fixtures.sshd import writable_by_nodes

    timelines = {user: node_shared / f"{user}.timeline" for user in ("alice", "bob")}
    for timeline in timelines.values():
        writable_by_nodes(timeline)
    envs = {}
    # Alice's backlog (90 x 4 s on 9 slots: 40 s) outlasts Bob's CLI coming up (~20 s on a busy machine): with
    # 1 s specs she now starts all 90 in ~12 s (no round trip per spec), before Bob has asked for anything
    for user, count, seconds in (("alice", 90, 4.0), ("bob", 5, 0.5)):
        home = tmp_path / user / "home"
        home.mkdir(parents=True)
        (home / "nodes.json").write_text(loopback_cluster.nodes_json.read_text())
        for i in range(count):
            shell_spec(tmp_path / user / "specs" / f"{user}-share", f"S{i:02d}", timelines[user], seconds=seconds)
        envs[user] = team_server.env(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(tmp_path / user / "specs"),
                                     DISPATCH_PROJECTS=str(tmp_path / user / "projects"))
    log = tmp_path / "alice.log"
    with open(log, "w") as out:
        alice = subprocess.Popen([sys.executable, "-m", "dispatch.cli.main", "start", "alice-share"], env=envs["alice"],
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_starts(timelines["alice"], 12, log, timeout=180)
        bob = _run([sys.executable, "-m", "dispatch.cli.main", "start", "bob-share"], envs["bob"], timeout=300)
        assert bob.returncode == 0, bob.stdout + bob.stderr
        assert alice.wait(timeout=300) == 0, log.read_text()
    finally:
        if alice.poll() is None:
            alice.kill()
    starts = {user: sorted(s for runs in read_timeline(t).values() for s, _ in runs) for user, t in timelines.items()}
    assert len(starts["bob"]) == 5 and len(starts["alice"]) == 90
    after = sum(1 for s in starts["alice"] if s > starts["bob"][-1])
    assert after >= 30, f"Alice started only {after} specs after Bob's last: Bob waited for her backlog"
    # once Bob has a slot, his other four follow within two rounds of Alice's 9 slots, not behind her queue
    # (Bob's start itself depends on how fast his CLI comes up: the count above has the room for that)
    between = sum(1 for s in starts["alice"] if starts["bob"][0] < s < starts["bob"][-1])
    assert between <= 18, f"Alice started {between} specs between Bob's first and last start"
