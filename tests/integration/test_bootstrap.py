"""Bootstrapping a node and `dispatch nodes add`, against a fresh real sshd node on loopback.

The node is a `LoopbackCluster` of one, with its own login user as on a real machine; that user gets
passwordless sudo (a file in /etc/sudoers.d, removed after), as a cloud image's admin user has, so the
bootstrap reaches root the way it does on a real node. Nothing is fetched from the internet: the packages
it needs are already here, and the agent CLIs (npm) are behind a flag these tests do not pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.cli.nodes_add import bootstrap
from dispatch.cluster.ssh import SSHPool
from dispatch.runner import zipapp
from rigs.loopback_cluster import LoopbackCluster, find_free_port
from tests.fixtures.projects import DISPATCH, shell_spec, write_spec
from tests.fixtures.sshd import agent_bin_for_nodes

pytestmark = [pytest.mark.integration]


@pytest.fixture
def fresh_node(cluster_base: Path) -> Iterator[LoopbackCluster]:
    """One fresh sshd node (`loop1`, 2 slots) with its own login user, which cannot use sudo yet."""
    if os.geteuid() != 0:
        pytest.fail("the bootstrap tests need root (a login user per node, sudo): run them as CI does")
    with LoopbackCluster() as cluster:
        cluster.start([2], cluster_base, port=0, login_users=True)
        yield cluster


@pytest.fixture
def sudo_node(fresh_node: LoopbackCluster) -> Iterator[LoopbackCluster]:
    """`fresh_node` whose login user has passwordless sudo."""
    if shutil.which("sudo") is None:
        pytest.fail("sudo is not installed: apt-get install -y sudo (bash .ci/run does this)")
    user = fresh_node.node("loop1")["user"]
    rule = Path("/etc/sudoers.d") / f"dispatch-test-{user}"
    rule.write_text(f"{user} ALL=(ALL) NOPASSWD:ALL\n")
    rule.chmod(0o440)
    try:
        yield fresh_node
    finally:
        rule.unlink(missing_ok=True)


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its mode, owner, size, content hash and modification time."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_gid, info.st_size, digest,
                                              info.st_mtime_ns)
    return found


def _bootstrap(cluster: LoopbackCluster, args: list[str], capsys: pytest.CaptureFixture) -> list[str]:
    with SSHPool() as pool:
        bootstrap(pool, cluster.target("loop1"), args)
    return [line.removeprefix("loop1: ") for line in capsys.readouterr().out.splitlines()]


def test_bootstrap_twice_makes_the_user_and_runner_then_changes_nothing(sudo_node: LoopbackCluster, capsys):
    user = f"dbt{uuid.uuid4().hex[:8]}"
    public_key = sudo_node.key_path.with_suffix(".pub").read_text().strip()
    args = ["--user", user, "--authorized-key", public_key]
    try:
        first = _bootstrap(sudo_node, args, capsys)
        assert f"changed: created user {user}" in first, first
        home = Path(pwd.getpwnam(user).pw_dir)
        runner_dir = home / "dispatch" / ".runner" / zipapp.build().version[:16]
        assert (runner_dir / "runner.pyz").read_bytes() == zipapp.build().data
        assert (home / ".ssh" / "authorized_keys").read_text().splitlines() == [public_key]
        assert (home / "dispatch").stat().st_uid == pwd.getpwnam(user).pw_uid
        assert (home / "dispatch").stat().st_mode & 0o777 == 0o700
        assert first[-1].endswith("change(s)"), first
        version = subprocess.run(["python3", str(runner_dir / "runner.pyz"), "version"], capture_output=True,
                                 text=True, check=True)
        assert json.loads(version.stdout)["runner_version"] == zipapp.build().version

        before, passwd = _tree(home), pwd.getpwnam(user)
        second = _bootstrap(sudo_node, args, capsys)
        assert second[-1] == "no change", second
        assert not [line for line in second if line.startswith("changed:")], second
        assert _tree(home) == before, "a second bootstrap changed the user's home"
        assert pwd.getpwnam(user) == passwd
        login_uid = pwd.getpwnam(sudo_node.node("loop1")["user"]).pw_uid
        assert [p for p in Path("/tmp").glob("tmp.*") if p.lstat().st_uid == login_uid] == [], \
            "the bootstrap's temporary directory was left on the node"
    finally:
        subprocess.run(["userdel", "--remove", user], capture_output=True, timeout=60)


def test_bootstrap_refuses_bad_arguments_before_changing_anything(sudo_node: LoopbackCluster, capsys):
    with SSHPool() as pool:
        for args, message in ((["--user", "Bad;name"], "--user 'Bad;name'"),
                              (["--agents", "claude,vim"], "unknown agent 'vim'"),
                              (["--worker", "n/1", "--user", "other"], "--worker 'n/1'"),
                              (["--worker", "n1", "--user", "other"], "--worker needs --package")):
            with pytest.raises(Exception, match="exited 2"):
                bootstrap(pool, sudo_node.target("loop1"), args)
            run = pool.run(sudo_node.target("loop1"), "sudo -n bash -c 'id other; id Bad'", timeout=30, check=False)
            assert run.exit_code != 0, "a refused bootstrap made a user"
            assert message in capsys.readouterr().out


def _add(name: str, node: dict, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`dispatch nodes add NAME` for a loopback node entry (its address, port, user, key and known_hosts)."""
    command = [DISPATCH, "nodes", "add", name, "--ssh-host", node["host"], "--port", str(node["port"]),
               "--user", node["user"], "--key", node["key_path"], "--known-hosts", node["known_hosts"],
               "--slots", "2", "--timeout", "5", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_nodes_add_refuses_bad_names_duplicates_unreachable_hosts_and_no_root(fresh_node: LoopbackCluster,
                                                                            isolated_home: Path):
    nodes_json = isolated_home / "home" / "nodes.json"
    nodes_json.write_text(json.dumps({"nodes": [{"name": "old1", "ssh_host": "old1.example", "slots": 4}]}))
    before = nodes_json.read_bytes()
    node = fresh_node.node("loop1")
    unreachable = {**node, "host": "127.0.0.9", "port": find_free_port(1)}
    (isolated_home / "empty_known_hosts").write_text("")
    unknown_key = {**node, "known_hosts": str(isolated_home / "empty_known_hosts")}
    cases = [
        ("bad/name", node, 2, "node name 'bad/name'"),
        ("../up", node, 2, "node name '../up'"),
        ("local", node, 2, "node name 'local' is the dispatcher's own machine"),
        ("old1", node, 2, "a node named 'old1' already exists"),
        ("ghost", unreachable, 1, "node ghost: unreachable"),
        ("stranger", unknown_key, 1, "is not in " + unknown_key["known_hosts"]),
        ("wk1", node, 2, "--worker: --api-url 'http://x/api\\nPATH=/evil'"),
        ("fresh1", node, 1, "cannot use `sudo -n`"),
    ]
    for name, entry, code, message in cases:
        extra = ("--worker", "--package", "/srv/od", "--api-url", "http://x/api\nPATH=/evil") if name == "wk1" else ()
        done = _add(name, entry, *extra)
        assert done.returncode == code, (name, done.stdout, done.stderr)
        assert message in " ".join(done.stderr.split()), (name, done.stderr)
        assert nodes_json.read_bytes() == before, f"nodes add {name} changed nodes.json"
    assert not list(fresh_node.home("loop1").glob("dispatch")), "a refused bootstrap made the run directory"


@pytest.mark.prefect
def test_nodes_add_bootstraps_a_fresh_node_that_then_runs_a_project(sudo_node: LoopbackCluster, prefect_api,
                                                                    run_project, isolated_home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    from blocks.cluster_node import ClusterNode

    secret = f"fake-ant-bootstrap-{uuid.uuid4().hex}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    monkeypatch.setenv("DISPATCH_SERVER_SLOTS", "false")  # the session server is SQLite (see test_cluster_flow.py)
    name = f"fresh-{uuid.uuid4().hex[:6]}"
    done = _add(name, sudo_node.node("loop1"), env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "changed: created" in done.stdout and f"node {name}: reachable" in done.stdout, done.stdout

    nodes_json = isolated_home / "home" / "nodes.json"
    [entry] = json.loads(nodes_json.read_text())["nodes"]
    assert (entry["name"], entry["slots"], entry["transport"], entry["user"]) == (
        name, 2, "ssh", sudo_node.node("loop1")["user"])
    assert ClusterNode.load(name).slots == 2
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(f"node-{name}").concurrency_limit == 2

    # the fake agent stands in for the claude CLI (npm stays off in tests): on the node's PATH through its env
    fakebin = agent_bin_for_nodes(sudo_node.base_dir / "fakebin", ("claude",))
    entry["env"] = {"PATH": f"{fakebin}:/usr/local/bin:/usr/bin:/bin"}
    nodes_json.write_text(json.dumps({"nodes": [entry]}))
    specs = isolated_home / "specs" / "fresh"
    shell_spec(specs, "S01-shell", sudo_node.base_dir / "timeline")
    write_spec(specs, "S02-agent.md", {"task_id": "S02-agent", "model": ["claude"], "depends_on": ["S01-shell"]},
               "## Goal\nwork\n\nFAKE: write out/done.txt done\n")
    (sudo_node.base_dir / "timeline").touch(mode=0o666)
    os.chmod(sudo_node.base_dir / "timeline", 0o666)
    Variable.unset("dispatch_cooldown_claude")
    state, summary = run_project("fresh")
    assert state.is_completed(), state.message
    assert {t: row.node for t, row in summary.specs.items()} == {"S01-shell": name, "S02-agent": name}

    home = sudo_node.home("loop1")
    logs = "".join(p.read_text(errors="replace") for p in home.rglob("task.log"))
    assert "env names: ANTHROPIC_API_KEY" in logs, "the key should have travelled with the attempt"
    leaks = [str(p) for p in home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == [], f"the API key was written on the node: {leaks}"


def test_bootstrap_worker_installs_its_env_and_unit_once_without_keys(tmp_path: Path):
    """The worker part, run for real as root in a private mount namespace (a copy of /etc, empty /opt and
    /var/lib), so it may make the `dispatch` user and write /etc without touching this machine. The venv is
    one that has Prefect already (no pip download); systemd does not run here, so the unit is installed only."""
    if os.geteuid() != 0:
        pytest.fail("the worker bootstrap test needs root (a mount namespace, useradd): run it as CI does")
    secret = f"sk-worker-{uuid.uuid4().hex}"
    venv = tmp_path / "opt" / "oyster-dispatch" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "prefect").symlink_to(Path(sys.executable).with_name("prefect"))
    (tmp_path / "varlib").mkdir()
    script = Path(__file__).parents[2] / "infra" / "bootstrap-node.sh"
    run = (f"bash {script} --worker n1 --package /nonexistent --api-url http://127.0.0.1:4200/api")
    inside = (f"set -e; cp -a /etc {tmp_path}/etc; mount --bind {tmp_path}/etc /etc; "
              f"mount --bind {tmp_path}/opt /opt; mount --bind {tmp_path}/varlib /var/lib; "
              f"{run}; echo '=== second'; {run}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", inside],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "ANTHROPIC_API_KEY": secret})
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = done.stdout.split("=== second\n")
    assert "changed: created user dispatch" in first, first
    assert "changed: wrote /etc/oyster-dispatch/worker.env" in first, first
    assert "changed: wrote /etc/systemd/system/prefect-worker@.service" in first, first
    assert "note: systemd is not running here: prefect-worker@n1.service is installed" in first, first
    assert second.splitlines()[-1] == "no change", second
    env_file = (tmp_path / "etc" / "oyster-dispatch" / "worker.env").read_text()
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in env_file
    assert (tmp_path / "etc" / "systemd" / "system" / "prefect-worker@.service").read_bytes() == (
        script.with_name("prefect-worker@.service").read_bytes())
    assert (tmp_path / "varlib" / "oyster-dispatch" / "dispatch").is_dir()
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
             and secret.encode() in p.read_bytes()]
    assert leaks == [], f"the API key was written: {leaks}"


def test_nodes_add_in_embedded_mode_with_skip_bootstrap_checks_and_writes_only_nodes_json(
        fresh_node: LoopbackCluster, isolated_home: Path):
    """A node bootstrapped by hand: only probed (no sudo needed), then listed; no Prefect server is started."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = _add("byhand", fresh_node.node("loop1"), "--skip-bootstrap", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "changed:" not in done.stdout, "--skip-bootstrap ran the bootstrap"
    assert "embedded mode: no block or work pool made" in " ".join(done.stdout.split())
    [entry] = json.loads((isolated_home / "home" / "nodes.json").read_text())["nodes"]
    assert (entry["name"], entry["port"]) == ("byhand", fresh_node.node("loop1")["port"])
    assert not (isolated_home / "home" / "locks" / "local-server.lock").exists(), "a Prefect server was started"
    again = _add("byhand", fresh_node.node("loop1"), "--skip-bootstrap", env=env)
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
