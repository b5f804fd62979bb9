"""Each node's agent CLI versions in `dispatch nodes check` and the guardian, on the loopback sshd cluster: a
version the contract tier has not passed (neither pinned in agents/package.json nor recorded by the drift
check) is flagged; the guardian tells it once and never drains the node for it.

The node's CLIs are small scripts answering `--version` as the real ones do ("2.1.332 (Claude Code)",
"codex-cli 0.171.0"), on the PATH of the node's `env`, as the contract tier puts the real ones there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.core.agent_versions import AcceptedVersions, pinned_versions
from dispatch.core.settings import get_settings
from dispatch.ops.health import Check
from dispatch.prefect.versions import VARIABLE

pytestmark = pytest.mark.integration

DISPATCH = str(Path(sys.executable).with_name("dispatch"))
UNPASSED = "0.999.1"


def _fake_cli(directory: Path, name: str, answer: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo '{answer}' && exit 0\nexit 2\n")
    path.chmod(0o755)


@pytest.fixture
def versioned_node(loopback_cluster, node_shared: Path, isolated_home: Path, prefect_api, monkeypatch):
    """nodes.json with loop1, whose PATH has the pinned claude and a codex at an unpassed version; no recorded
    passed versions on the server before or after."""
    from prefect.variables import Variable

    pinned = pinned_versions()
    assert pinned.keys() == {"claude", "codex"} and pinned["codex"] != UNPASSED
    bin_dir = node_shared / "bin"
    bin_dir.mkdir(mode=0o755)
    _fake_cli(bin_dir, "claude", f"{pinned['claude']} (Claude Code)")
    _fake_cli(bin_dir, "codex", f"codex-cli {UNPASSED}")
    node = {**loopback_cluster.node("loop1"), "env": {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}}
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [node]}))
    monkeypatch.setenv("DISPATCH_GUARDIAN_MAX_LOAD", "1000")
    get_settings.cache_clear()
    Variable.unset(VARIABLE)
    yield pinned
    Variable.unset(VARIABLE)


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCH, "nodes", "check", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "250"})


def test_nodes_check_shows_each_cli_version_and_flags_one_the_contract_tier_has_not_passed(versioned_node):
    from prefect.variables import Variable

    pinned = versioned_node
    done = _check("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    row = json.loads(done.stdout)["nodes"][0]
    assert row["versions"] == {"claude": f"{pinned['claude']} (Claude Code)", "codex": f"codex-cli {UNPASSED}"}, row
    assert len(row["unproved"]) == 1 and row["unproved"][0].startswith(f"codex {UNPASSED} has not passed"), row
    assert pinned["codex"] in row["unproved"][0], "the flag names the versions that are proved"

    table = _check()
    assert table.returncode == 0, table.stderr
    assert f"codex {UNPASSED} (not passed)" in table.stdout and f"claude {pinned['claude']}" in table.stdout
    assert f"warning: loop1: codex {UNPASSED} has not passed the contract tier" in table.stdout

    Variable.set(VARIABLE, {"codex": [UNPASSED]}, overwrite=True)  # the drift check passed it
    again = json.loads(_check("--json").stdout)["nodes"][0]
    assert again["unproved"] == [], again


def test_the_guardian_reports_the_versions_and_flags_an_unpassed_one(versioned_node):
    from dispatch.ops.guardian import run_cycle

    pinned = versioned_node
    report = run_cycle(get_settings(), repair=False, alert=False)
    found = {c.name: c for c in report.checks if c.target == "loop1"}
    check = found["agent_versions"]
    assert check.status == "FAIL" and f"codex {UNPASSED} has not passed" in check.detail, check.to_json()
    assert found["reachable"].ok and found["agents"].ok, [c.to_json() for c in report.checks]

    from prefect.variables import Variable

    Variable.set(VARIABLE, {"codex": [UNPASSED]}, overwrite=True)
    again = {c.name: c for c in run_cycle(get_settings(), repair=False, alert=False).checks if c.target == "loop1"}
    assert again["agent_versions"].ok, again["agent_versions"].to_json()
    assert f"claude {pinned['claude']}, codex {UNPASSED}" in again["agent_versions"].detail


def test_an_unpassed_cli_version_is_told_once_and_never_drains_the_node(isolated_home, monkeypatch):
    from dispatch.core.drain import drained_nodes
    from dispatch.ops.guardian.policy import apply_policy
    from dispatch.prefect.drained import drained_store

    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    settings = get_settings()
    flag = AcceptedVersions(pinned={"codex": "0.171.0"}).flag("codex", f"codex-cli {UNPASSED}")
    assert flag and flag.startswith(f"codex {UNPASSED} has not passed")
    alerts = []
    for _ in range(3):
        found, drained, _ = apply_policy(settings, [Check("loop1", "agent_versions", False, flag),
                                                    Check("loop1", "reachable", True, "ok")], drain_after=2)
        alerts += found
        assert drained == [] and "loop1" not in drained_nodes(drained_store(settings))
    assert [a.subject for a in alerts] == ["[dispatch guardian] loop1: agent_versions failing"]
    _, drained, _ = apply_policy(settings, [Check("loop1", "reachable", False, "refused")], drain_after=2)
    assert drained == [], "an advisory failure counted no cycle towards draining"
