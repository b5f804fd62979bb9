"""The SSH transport against real sshd nodes on loopback addresses (nothing mocked)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dispatch.cluster.ssh import CommandTimeout, SSHPool, resolve_target
from dispatch.core.errors import NodeError, RemoteCommandFailed
from rigs.loopback_cluster import LoopbackCluster

# the fixtures `loopback_cluster` and `ssh_pool` (tests/conftest.py may also import them)
pytestmark = pytest.mark.integration


def _running(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_runs_a_command_on_every_node_as_its_own_user_in_its_own_home(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    users = set()
    for node in loopback_cluster.nodes:
        result = ssh_pool.run(loopback_cluster.target(node["name"]), "echo $SSH_CONNECTION; pwd; id -un",
                              timeout=10)
        assert result.exit_code == 0
        connection, cwd, user = result.stdout.splitlines()
        assert connection.split()[2:] == [node["host"], str(node["port"])]
        assert cwd == str(loopback_cluster.home(node["name"])) and user == node["user"]
        assert result.stderr == ""
        users.add(user)
    assert ssh_pool.connections_by_node == {"loop1": 1, "loop2": 1, "loop3": 1}
    if os.geteuid() == 0:  # laid out like real machines: one login user each, the run root under its home
        assert len(users) == 3 and "root" not in users
        assert {node["remote_root"] for node in loopback_cluster.nodes} == {"~/dispatch"}


def test_output_streams_line_by_line_in_order(loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    seen: list[tuple[str, str, float]] = []
    started = time.monotonic()
    result = ssh_pool.run(
        loopback_cluster.target("loop1"),
        "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.1; done; printf 'no newline'",
        timeout=10, on_line=lambda stream, line: seen.append((stream, line, time.monotonic() - started)),
    )
    assert [line for stream, line, _ in seen if stream == "stdout"] == [
        "out1", "out2", "out3", "out4", "out5", "no newline"]
    assert [line for stream, line, _ in seen if stream == "stderr"] == [f"err{i}" for i in range(1, 6)]
    assert seen[0][2] < result.duration - 0.25, "the first line arrived only at the end: not streamed"
    assert result.stdout == "out1\nout2\nout3\nout4\nout5\nno newline"
    assert result.stderr.endswith("err5\n")


def test_nonzero_exit_raises_with_host_command_code_and_stderr_tail(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    target = loopback_cluster.target("loop2")
    command = "for i in $(seq 1 50); do echo line$i >&2; done; exit 3"
    with pytest.raises(RemoteCommandFailed) as failed:
        ssh_pool.run(target, command, timeout=10)
    assert (failed.value.host, failed.value.command, failed.value.exit_code) == ("loop2", command, 3)
    assert failed.value.stderr_tail.splitlines() == [f"line{i}" for i in range(31, 51)]
    assert "exited 3" in str(failed.value) and "line50" in str(failed.value)
    assert ssh_pool.run(target, "exit 4", timeout=10, check=False).exit_code == 4


def test_timeout_kills_the_remote_process_group(loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    marker = f"30{uuid.uuid4().int % 10**6}.5"  # a unique sleep length to find the processes by
    command = f"(sleep {marker}; echo never) & sleep {marker}; echo never"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as timed_out:
        ssh_pool.run(loopback_cluster.target("loop1"), command, timeout=1.0)
    assert time.monotonic() - started < 5
    assert timed_out.value.exit_code == -1 and isinstance(timed_out.value, RemoteCommandFailed)
    assert "timed out after 1 s" in str(timed_out.value)
    assert _running(marker) == []


def test_env_and_stdin_reach_the_command_but_not_its_command_line(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    secret = "s3cr'et value\nline2"
    result = ssh_pool.run(
        loopback_cluster.target("loop1"),
        'printf "%s|" "$API_KEY"; cat; tr "\\0" " " < /proc/$$/cmdline',
        timeout=10, env={"API_KEY": secret}, stdin_data="from stdin\n")
    key, rest = result.stdout.split("|", 1)
    assert key == secret
    assert rest.startswith("from stdin\n")
    assert "s3cr" not in rest  # the process's command line (what `ps` shows) has no secret
    with pytest.raises(ValueError, match="not valid"):
        ssh_pool.run(loopback_cluster.target("loop1"), "true", timeout=10, env={"BAD-NAME": "x"})


def test_twenty_commands_from_ten_threads_share_one_connection(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    target = loopback_cluster.target("loop2")
    results: list[str] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(2):
                results.append(ssh_pool.run(target, f"sleep 0.3; echo {index}-{round_}", timeout=20).stdout)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == sorted(f"{i}-{r}\n" for i in range(10) for r in range(2))
    assert time.monotonic() - started < 4, "commands did not run concurrently"
    assert ssh_pool.connections_opened == 1


def test_server_session_limit_spills_over_to_another_connection(cluster_base: Path) -> None:
    with LoopbackCluster() as cluster, SSHPool(max_sessions=10) as pool:
        cluster.start([1], cluster_base, port=0, max_sessions=2)  # sshd refuses a third channel
        target = cluster.target("loop1")
        results: list[str] = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            pool.run(target, f"sleep 0.5; echo {i}", timeout=20).stdout)) for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [f"{i}\n" for i in range(5)]
        assert pool.connections_opened == 3


def test_ssh_config_alias_gives_hostname_port_user_key_and_known_hosts(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool, tmp_path: Path) -> None:
    node = loopback_cluster.node("loop3")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host worker-a\n  HostName {node['host']}\n  Port {node['port']}\n  User {node['user']}\n"
        f"  IdentityFile {node['key_path']}\n  UserKnownHostsFile {node['known_hosts']}\n"
        "Host *\n  User nobody-by-default\n")
    target = resolve_target("loop3", "worker-a", ssh_config_path=config)
    assert (target.host, target.port, target.user) == (node["host"], node["port"], node["user"])
    assert (target.key_path, target.known_hosts) == (node["key_path"], node["known_hosts"])
    assert ssh_pool.run(target, "echo ok", timeout=10).stdout == "ok\n"
    # explicit fields win over the config; user@alias names the user
    explicit = resolve_target("loop3", "someone@worker-a", port=2, key_path="/k", ssh_config_path=config)
    assert (explicit.port, explicit.user, explicit.key_path) == (2, "someone", "/k")
    # the cluster's own ssh_config has one alias per node, named like the node
    from_cluster = resolve_target("loop1", "loop1", ssh_config_path=loopback_cluster.ssh_config)
    assert ssh_pool.run(from_cluster, "echo $SSH_CONNECTION", timeout=10).stdout.split()[2] == "127.0.0.2"


def test_unknown_host_key_is_refused_with_a_fix_unless_trusted_on_first_use(
        loopback_cluster: LoopbackCluster, tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"
    port = loopback_cluster.port
    with SSHPool() as pool, pytest.raises(NodeError) as refused:
        pool.run(loopback_cluster.target("loop1", known_hosts=str(known)), "true", timeout=10)
    assert f"ssh-keyscan -p {port} 127.0.0.2 >> {known}" in str(refused.value)
    assert "trust_on_first_use" in str(refused.value)

    with SSHPool() as pool:
        trusting = loopback_cluster.target("loop1", known_hosts=str(known), trust_on_first_use=True)
        assert pool.run(trusting, "echo ok", timeout=10).stdout == "ok\n"
    assert known.read_text().startswith(f"[127.0.0.2]:{port} ssh-ed25519 ")
    with SSHPool() as pool:  # saved: now known without trusting
        assert pool.run(loopback_cluster.target("loop1", known_hosts=str(known)), "true", timeout=10)

    # a known host presenting another key is refused, even with trust on first use
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(known.read_text().replace("127.0.0.2", "127.0.0.3"))
    with SSHPool() as pool, pytest.raises(NodeError, match="does not match"):
        pool.connect(loopback_cluster.target("loop2", known_hosts=str(wrong), trust_on_first_use=True))


def test_authentication_failure_names_the_key_and_key_secret_works(
        loopback_cluster: LoopbackCluster, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with SSHPool() as pool, pytest.raises(NodeError) as denied:
        pool.connect(loopback_cluster.target("loop1", key_path=str(stranger)))
    assert "authentication" in str(denied.value) and str(stranger) in str(denied.value)
    with SSHPool() as pool, pytest.raises(NodeError, match="does not exist"):
        pool.connect(loopback_cluster.target("loop1", key_path=str(tmp_path / "missing")))

    secret = Path(loopback_cluster.key_path).read_text()
    target = loopback_cluster.target("loop1", key_path=None, key_secret=secret)
    assert "PRIVATE" not in repr(target)
    with SSHPool() as pool:
        assert pool.run(target, "echo ok", timeout=10).stdout == "ok\n"


def test_killed_node_fails_fast_and_pool_reconnects_after_restart(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool) -> None:
    target = loopback_cluster.target("loop3")
    marker = f"40{uuid.uuid4().int % 10**6}.5"
    outcome: list[BaseException] = []

    def long_command() -> None:
        try:
            ssh_pool.run(target, f"sleep {marker}", timeout=60)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    try:
        runner = threading.Thread(target=long_command)
        runner.start()
        deadline = time.monotonic() + 5
        while not _running(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at = time.monotonic()
        loopback_cluster.kill("loop3")
        runner.join(timeout=10)
        assert time.monotonic() - killed_at < 3
        assert len(outcome) == 1 and isinstance(outcome[0], NodeError), outcome
        assert "connection lost" in str(outcome[0])
        assert _running(marker) == [], "the machine died: its processes must be gone"
        with pytest.raises(NodeError, match="unreachable"):
            ssh_pool.run(target, "true", timeout=10)
    finally:
        loopback_cluster.restart("loop3")
    assert ssh_pool.run(target, "echo back", timeout=10).stdout == "back\n"
    # an idle connection dropped by a restart is reopened without the caller noticing
    loopback_cluster.restart("loop3")
    assert ssh_pool.run(target, "echo again", timeout=10).stdout == "again\n"
    assert ssh_pool.connections_by_node == {"loop3": 3}


def test_put_dir_and_get_dir_roundtrip_skipping_git(
        loopback_cluster: LoopbackCluster, ssh_pool: SSHPool, tmp_path: Path) -> None:
    source = tmp_path / "project"
    (source / "src" / "deep").mkdir(parents=True)
    (source / ".git" / "objects").mkdir(parents=True)
    (source / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (source / "README.md").write_text("hello\n")
    (source / "src" / "deep" / "data.bin").write_bytes(bytes(range(256)) * 100)
    (source / "run.sh").write_text("#!/bin/sh\necho run\n")
    (source / "run.sh").chmod(0o755)
    target = loopback_cluster.target("loop2")
    remote = f"sync-{uuid.uuid4().hex[:8]}/project"  # relative: from the login's home, for SFTP and commands

    assert ssh_pool.put_dir(target, source, remote) == 3
    assert ssh_pool.run(target, f"cd {remote} && ./run.sh && ls -A", timeout=10).stdout == (
        "run\nREADME.md\nrun.sh\nsrc\n")
    back = tmp_path / "back"
    assert ssh_pool.get_dir(target, remote, back) == 3
    for name in ("README.md", "run.sh", "src/deep/data.bin"):
        assert (back / name).read_bytes() == (source / name).read_bytes()
    assert os.access(back / "run.sh", os.X_OK) and not (back / ".git").exists()

    ssh_pool.put_file(target, b"#!/bin/sh\n", f"{remote}/new/dir/tool", mode=0o700)
    assert ssh_pool.run(target, f"stat -c %a {remote}/new/dir/tool", timeout=10).stdout == "700\n"
    assert ssh_pool.read_file(target, f"{remote}/README.md") == b"hello\n"
    assert (loopback_cluster.home("loop2") / remote / "README.md").read_text() == "hello\n"
    assert ssh_pool.get_file(target, f"{remote}/README.md", tmp_path / "x" / "r.md").read_text() == "hello\n"
    with pytest.raises(FileNotFoundError):
        ssh_pool.read_file(target, f"{remote}/missing")


def test_cluster_refuses_a_port_in_use_and_cli_stops_on_sigterm(
        loopback_cluster: LoopbackCluster, tmp_path: Path, cluster_base: Path) -> None:
    with LoopbackCluster() as other, pytest.raises(NodeError, match="already in use"):
        other.start([1], tmp_path / "other", port=loopback_cluster.port)

    cli = subprocess.Popen(
        [sys.executable, "-m", "rigs.loopback_cluster", "up", "--slots", "1,2", "--dir",
         str(cluster_base / "cli"), "--port", "0"], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2])  # rigs/ is imported from the repository root
    try:
        nodes_json = Path(cli.stdout.readline().strip())  # type: ignore[union-attr]
        assert nodes_json.name == "nodes.json"
        assert '"slots": 2' in nodes_json.read_text()
        pid = int((nodes_json.parent / "loop1" / "sshd.pid").read_text())
    finally:
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=10) == 0
    assert not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()
