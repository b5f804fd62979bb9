"""`dispatch nodes drain|undrain` and the drained nodes in `dispatch nodes`, embedded and on the team server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.projects import DISPATCH

pytestmark = pytest.mark.prefect


def _dispatch(*args: str, server: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    if not server:
        env.pop("PREFECT_API_URL", None)
    return subprocess.run([DISPATCH, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def two_nodes(isolated_home: Path) -> Path:
    home = isolated_home / "home"
    (home / "nodes.json").write_text(json.dumps({"nodes": [
        {"name": "gpu1", "ssh_host": "gpu1.example", "slots": 2},
        {"name": "gpu2", "ssh_host": "gpu2.example", "slots": 4}]}))
    return home


def test_drain_and_undrain_embedded_show_in_the_listing_with_reason_by_whom_and_since(two_nodes: Path):
    drained = _dispatch("nodes", "drain", "gpu2", "--reason", "disk replaced tonight", server=False)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "gpu2 drained" in drained.stdout
    assert "gpu2" in json.loads((two_nodes / "drained.json").read_text())

    listing = _dispatch("nodes", "--json", server=False)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)["nodes"]}
    assert rows["gpu1"]["drained"] is None
    info = rows["gpu2"]["drained"]
    assert info["reason"] == "disk replaced tonight" and "@" in info["by"] and info["since"] > 0
    table = _dispatch("nodes", server=False)
    line = next(line for line in table.stdout.splitlines() if "gpu2" in line)
    assert "drained" in line and "disk replaced tonight" in table.stdout

    again = _dispatch("nodes", "drain", "gpu2", server=False)
    assert again.returncode == 0 and "already drained" in again.stdout
    undrained = _dispatch("nodes", "undrain", "gpu2", server=False)
    assert undrained.returncode == 0 and "gpu2 undrained" in undrained.stdout
    rows = {row["name"]: row for row in json.loads(_dispatch("nodes", "--json", server=False).stdout)["nodes"]}
    assert rows["gpu2"]["drained"] is None
    assert "was not drained" in _dispatch("nodes", "undrain", "gpu2", server=False).stdout


def test_draining_an_unknown_node_exits_2_naming_nodes_json_and_the_known_nodes(two_nodes: Path):
    for command in ("drain", "undrain"):
        result = _dispatch("nodes", command, "gpu9", server=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "no node 'gpu9'" in result.stderr and str(two_nodes / "nodes.json") in result.stderr
        assert "known: gpu1, gpu2" in result.stderr
    assert not (two_nodes / "drained.json").exists(), "nothing half-done"


def test_team_mode_drains_on_the_server_for_every_users_dispatcher(prefect_api, two_nodes: Path):
    from prefect.variables import Variable

    Variable.unset("dispatch_drained")
    try:
        result = _dispatch("nodes", "drain", "gpu1", "--reason", "flaky disk")
        assert result.returncode == 0, result.stdout + result.stderr
        assert Variable.get("dispatch_drained")["gpu1"]["reason"] == "flaky disk"
        rows = {row["name"]: row for row in json.loads(_dispatch("nodes", "--json").stdout)["nodes"]}
        assert rows["gpu1"]["drained"]["reason"] == "flaky disk" and rows["gpu2"]["drained"] is None
        assert _dispatch("nodes", "undrain", "gpu1").returncode == 0
        assert "gpu1" not in (Variable.get("dispatch_drained") or {})
    finally:
        Variable.unset("dispatch_drained")
