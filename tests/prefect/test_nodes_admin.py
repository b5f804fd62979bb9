"""`dispatch nodes` on the real Prefect API and real sshd nodes: blocks, work pools, concurrency limits, probes.

The session's Prefect server is shared by every test, so each test names its nodes uniquely and removes
the pools, limits and blocks it made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.cluster.config import load_nodes
from dispatch.core.nodes import Node
from dispatch.core.results import ProjectState, save_state
from dispatch.core.settings import get_settings
from tests.fixtures.prefect_free import run_without_prefect

pytestmark = pytest.mark.prefect
DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def dispatch(*args: str, timeout: float = 120, server: bool = True) -> subprocess.CompletedProcess:
    """Run the `dispatch` console script; `server=False` runs it in embedded mode (no PREFECT_API_URL)."""
    env = {**os.environ, "COLUMNS": "200"}
    if not server:
        env.pop("PREFECT_API_URL", None)
    return subprocess.run([DISPATCH, *args], capture_output=True, text=True, timeout=timeout, env=env)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_nodes(home: Path, nodes: list[dict]) -> Path:
    path = home / "nodes.json"
    path.write_text(json.dumps({"nodes": nodes}, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def prefect_objects(prefect_api) -> Iterator[list[str]]:
    """Names of node pools/limits (`node-<name>`) and node blocks to delete after the test."""
    names: list[str] = []
    yield names
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from blocks.cluster_node import ClusterNode, block_name

    with get_client(sync_client=True) as client:
        for name in names:
            for delete in (client.delete_work_pool, client.delete_global_concurrency_limit_by_name):
                try:
                    delete(f"node-{name}")
                except ObjectNotFound:
                    pass
            try:
                ClusterNode.delete(block_name(name))
            except (ValueError, ObjectNotFound):
                pass


def test_import_saves_blocks_that_load_back_equal_and_never_show_the_key(
        prefect_objects, isolated_home: Path, caplog: pytest.LogCaptureFixture):
    from blocks.agent_model import AgentModel
    from blocks.cluster_node import ClusterNode, block_name
    from dispatch.core.model_catalog import BUILTIN_MODELS
    from dispatch.prefect.nodes_admin import import_nodes, node_keys

    home = isolated_home / "home"
    secret = f"SECRET-KEY-MATERIAL-{uuid.uuid4().hex}"
    key_file = isolated_home / "id_test"
    armour = "OPENSSH PRIVATE KEY"  # a made-up key: only its text matters here
    key_file.write_text(f"-----BEGIN {armour}-----\n{secret}\n-----END {armour}-----\n")
    gpu, cpu = unique("GPU_Box"), unique("cpu")
    prefect_objects += [gpu, cpu]
    write_nodes(home, [
        {"name": gpu, "ssh_host": "gpu.example", "slots": 4, "api_mode": "direct", "executor": "glm",
         "priority": 2, "labels": ["gpu", "big"], "models": ["glm", "codex"], "port": 2200, "user": "agent",
         "key_path": str(key_file), "remote_root": "/srv/dispatch"},
        {"name": cpu, "transport": "worker", "slots": 1},
    ])

    result = dispatch("nodes", "import", "--embed-keys")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dispatch-cluster-node/{block_name(gpu)} (private key stored as a secret)" in result.stdout
    assert secret not in result.stdout + result.stderr

    expected = {node.name: node for node in load_nodes(get_settings())}
    for name in (gpu, cpu):
        block = ClusterNode.load(block_name(name))
        assert block.to_node() == expected[name]
    gpu_block = ClusterNode.load(block_name(gpu))
    assert block_name(gpu) == gpu.lower().replace("_", "-")
    assert gpu_block.private_key is not None and gpu_block.private_key.get_secret_value() == key_file.read_text()
    assert secret not in repr(gpu_block) and secret not in str(gpu_block)
    assert ClusterNode.load(block_name(cpu)).private_key is None
    target = gpu_block.ssh_target()
    assert (target.host, target.port, target.user, target.key_secret) == (
        "gpu.example", 2200, "agent", key_file.read_text())
    assert secret not in repr(target)

    # a re-import without keys keeps the saved key (e.g. pasted in the UI) and logs nothing secret
    with caplog.at_level(logging.DEBUG):
        lines = import_nodes(get_settings())
    assert any(gpu in line and "secret" in line for line in lines)
    assert ClusterNode.load(block_name(gpu)).private_key.get_secret_value() == key_file.read_text()
    assert secret not in caplog.text and secret not in "\n".join(lines)
    keys = node_keys(load_nodes(get_settings()))
    assert list(keys) == [gpu] and keys[gpu].get_secret_value() == key_file.read_text()

    for name, spec in BUILTIN_MODELS.items():
        model = AgentModel.load(name)
        assert model.to_model_spec() == spec
        assert model.secret_env() == {}


def test_agent_model_key_is_a_secret_unwrapped_only_by_secret_env(prefect_api):
    from pydantic import SecretStr

    from blocks.agent_model import AgentModel

    name = unique("glm-team")
    token = f"tok-{uuid.uuid4().hex}"
    model = AgentModel.builtin("glm")
    model.name, model.api_key = name, token  # a plain string still becomes a SecretStr
    model.save(name)
    try:
        loaded = AgentModel.load(name)
        assert isinstance(loaded.api_key, SecretStr) and token not in repr(loaded)
        assert loaded.secret_env() == {"ANTHROPIC_AUTH_TOKEN": token}
        spec = loaded.to_model_spec()
        assert spec.env == {"ANTHROPIC_BASE_URL": "https://api.z.ai/api/anthropic"} and token not in repr(spec)
    finally:
        AgentModel.delete(name)
    with pytest.raises(ValueError, match="key_env"):
        AgentModel(name="x", command=["x", "{prompt}"], api_key="k")
    with pytest.raises(ValueError, match="prompt"):
        AgentModel(name="x", command=["x", "-p"])


def test_sync_matches_pools_and_limits_to_slots_without_resetting_held_slots(prefect_objects):
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from dispatch.prefect.nodes_admin import node_load, sync_pools

    names = [unique("sync-a"), unique("sync-b")]
    prefect_objects += names
    nodes = [Node(name=names[0], slots=2, host="127.0.0.1"), Node(name=names[1], slots=3, transport="local")]

    def limits() -> dict[str, tuple[int | None, str, int, int]]:
        with get_client(sync_client=True) as client:
            found = {}
            for node in nodes:
                pool, gcl = client.read_work_pool(node.pool), client.read_global_concurrency_limit_by_name(node.pool)
                found[node.name] = (pool.concurrency_limit, pool.type, gcl.limit, gcl.active_slots)
            return found

    created = sync_pools(nodes)
    assert len(created) == 4 and all("created" in line for line in created)
    assert limits() == {names[0]: (2, "process", 2, 0), names[1]: (3, "process", 3, 0)}
    assert sync_pools(nodes) == []  # idempotent

    with concurrency(f"node-{names[0]}", occupy=1, strict=True):
        assert node_load(nodes) == {names[0]: {"slots": 2, "used": 1}, names[1]: {"slots": 3, "used": 0}}
        nodes[0].slots = 5
        changed = sync_pools(nodes)
        assert changed == [f"work pool node-{names[0]}: concurrency limit 2 -> 5",
                           f"concurrency limit node-{names[0]}: limit 2 -> 5 (1 in use)"]
        assert limits()[names[0]] == (5, "process", 5, 1), "the held slot must survive the update"
    assert node_load(nodes)[names[0]] == {"slots": 5, "used": 0}
    assert sync_pools(nodes) == []


def test_nodes_json_lists_slots_in_use_from_state_files_and_the_server(prefect_objects, isolated_home: Path):
    from prefect.concurrency.sync import concurrency

    from dispatch.prefect.nodes_admin import sync_pools

    home = isolated_home / "home"
    busy, shared, idle = unique("busy"), unique("shared"), unique("idle")
    prefect_objects.append(shared)
    write_nodes(home, [
        {"name": busy, "ssh_host": "busy.example", "slots": 2, "labels": ["gpu"]},
        {"name": shared, "ssh_host": "shared.example", "slots": 3, "priority": 1},
        {"name": idle, "host": "127.0.0.99", "port": 2222, "user": "me", "slots": 1, "transport": "worker"},
    ])
    settings = get_settings()
    save_state(settings.state_dir, ProjectState(project="live", pid=os.getpid(),
                                                nodes={busy: {"slots": 2, "used": 1}}))
    save_state(settings.state_dir, ProjectState(project="dead", pid=2**22 + 12345, state="running",
                                                nodes={busy: {"slots": 2, "used": 1}}))
    sync_pools([node for node in load_nodes(settings) if node.name == shared])

    with concurrency(f"node-{shared}", occupy=2, strict=True):
        result = dispatch("nodes", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["nodes"]}
    assert list(rows) == [busy, shared, idle]
    assert rows[busy].items() >= {"transport": "ssh", "host": "busy.example", "slots": 2, "used": 1,
                                  "used_local": 1, "labels": ["gpu"], "synced": False}.items()
    assert rows[shared].items() >= {"slots": 3, "used": 2, "used_server": 2, "synced": True,
                                    "pool": f"node-{shared}"}.items()
    assert rows[idle].items() >= {"transport": "worker", "host": "me@127.0.0.99:2222", "used": 0}.items()

    # without a server: this machine's runs only, and no Prefect import (fast)
    table = dispatch("nodes", server=False)
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if busy in line)
    assert "busy.example" in line and "1/2" in line and "gpu" in line
    assert "0/3" in next(line for line in table.stdout.splitlines() if shared in line)


def test_a_bad_nodes_json_exits_2_naming_the_field(isolated_home: Path):
    write_nodes(isolated_home / "home", [{"name": "gpu1", "ssh_host": "gpu1", "slots": "four"}])
    for args in (("nodes",), ("nodes", "--json"), ("nodes", "sync"), ("nodes", "check")):
        result = dispatch(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "nodes[0] (gpu1).slots: must be a whole number of slots >= 1, got 'four'" in result.stderr, args
        assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_check_reaches_every_loopback_node_and_flags_an_unreachable_one(loopback_cluster, isolated_home: Path):
    home = isolated_home / "home"
    shutil.copy(loopback_cluster.nodes_json, home / "nodes.json")
    result = dispatch("nodes", "check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["unreachable"] == []
    assert [(n["name"], n["reachable"]) for n in report["nodes"]] == [("loop1", True), ("loop2", True),
                                                                      ("loop3", True)]
    assert all(n["python"].startswith("Python 3.") for n in report["nodes"]), report
    assert all(("git" in n["clis"]) == bool(shutil.which("git")) for n in report["nodes"]), report

    one = dispatch("nodes", "check", "loop2")
    assert one.returncode == 0, one.stderr
    assert "loop2" in one.stdout and "loop1" not in one.stdout

    nodes = json.loads((home / "nodes.json").read_text())["nodes"]
    nodes.append({**nodes[0], "name": "gone", "host": "127.0.0.1", "port": 1})  # nothing listens there
    write_nodes(home, nodes)
    down = dispatch("nodes", "check", "--timeout", "3")
    assert down.returncode == 1, down.stdout + down.stderr
    assert "1 node(s) unreachable: gone" in down.stderr
    assert "loop3" in down.stdout


def test_check_of_an_unknown_node_names_the_known_ones(isolated_home: Path):
    write_nodes(isolated_home / "home", [{"name": "gpu1", "ssh_host": "gpu1", "slots": 2}])
    result = dispatch("nodes", "check", "gpu9")
    assert result.returncode == 2
    assert "no node 'gpu9'" in result.stderr and "known: gpu1" in result.stderr


def test_listing_and_checking_never_import_prefect_without_a_server(isolated_home: Path):
    write_nodes(isolated_home / "home", [{"name": "local", "transport": "local", "slots": 2}])
    run_without_prefect("dispatch.cli.nodes", "nodes_app", ["--json"], ["check", "--json"])
