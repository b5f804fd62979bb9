"""`dispatch monitor`: the `--once --json` snapshot of a real running project, embedded state files, and the
live view ending cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dispatch.core.drain import drain
from dispatch.core.results import ProjectState, SpecRow, save_state
from dispatch.core.settings import get_settings
from dispatch.ops.monitor import cost_usd, take_snapshot
from dispatch.prefect.drained import drained_store
from tests.fixtures.prefect_free import run_without_prefect
from tests.fixtures.projects import DISPATCH, shell_spec, start_in_background, write_spec

pytestmark = pytest.mark.prefect


def _monitor_json(server: bool = True) -> dict:
    env = {**os.environ, "COLUMNS": "200"}
    if not server:
        env.pop("PREFECT_API_URL", None)
    result = subprocess.run([DISPATCH, "monitor", "--once", "--json"], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_once_json_shows_a_running_spec_a_drained_node_a_cooldown_and_a_failure(fake_agents, isolated_home: Path):
    from prefect.variables import Variable

    from dispatch.prefect.cooldowns import server_cooldowns

    specs = isolated_home / "specs" / "watched"
    write_spec(specs, "S01.md", {"task_id": "S01", "model": ["claude"]},
               "## Goal\nWork a while.\n\nFAKE: mode=slow:60\n")
    shell_spec(specs, "S02", isolated_home / "timeline", seconds=0.1, extra="exit 3", retries=0)
    settings = get_settings()
    Variable.unset("dispatch_drained")
    reset = time.time() + 3600
    server_cooldowns().set("minimax", reset, "test: usage limit exceeded", "tester@test")
    log = isolated_home / "run.log"
    run = start_in_background("watched", log, env={**os.environ, "DISPATCH_LOCAL_SLOTS": "2"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            snapshot = take_snapshot(settings)
            if [r["task_id"] for r in snapshot.running] == ["S01"] and snapshot.failures:
                break
            assert run.poll() is None, log.read_text()
            time.sleep(0.2)
        drain(drained_store(settings), "local", reason="test: maintenance", by="tester@test")
        data = _monitor_json()
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
        Variable.unset("dispatch_drained")
        server_cooldowns().clear("minimax")

    assert data["mode"] == "team" and data["prefect_api_url"] == os.environ["PREFECT_API_URL"]
    [node] = data["nodes"]
    assert node["name"] == "local" and node["slots"] == 2 and node["used"] >= 1 and len(node["load"]) == 3
    assert node["drained"]["reason"] == "test: maintenance" and node["drained"]["by"] == "tester@test"
    [running] = data["running"]
    assert running["project"] == "watched" and running["task_id"] == "S01" and running["node"] == "local"
    assert running["model"] == "claude" and running["elapsed_s"] > 0 and "@" in running["user"]
    assert "cost_usd" in running
    [project] = [p for p in data["projects"] if p["project"] == "watched"]
    assert project | {"cost_usd": None} == {"project": "watched", "user": running["user"], "state": "running",
                                            "queued": 0, "running": 1, "succeeded": 0, "failed": 1, "total": 2,
                                            "cost_usd": None}
    [failure] = data["failures"]
    assert failure["task_id"] == "S02" and failure["project"] == "watched" and "exit" in failure["reason"].lower()
    cooling = {c["model"]: c for c in data["cooldowns"]}
    assert cooling["minimax"]["state"] == "cooling" and cooling["minimax"]["until"] == pytest.approx(reset)
    assert cooling["minimax"]["reason"] == "test: usage limit exceeded"
    assert "watched" in [r["project"] for r in data["team_runs"]]


def test_embedded_snapshot_reads_the_state_files_and_never_imports_prefect(isolated_home: Path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    settings = get_settings()
    now = time.time()
    save_state(settings.state_dir, ProjectState(project="alpha", pid=os.getpid(), user="ann", host="box", specs={
        "S01": SpecRow(state="running", node="local", model="glm", started_at=now - 90, attempts=1),
        "S02": SpecRow(state="waiting"), "S03": SpecRow(state="retrying"),
        "S04": SpecRow(state="failed", node="local", model="glm", ended_at=now - 5, reason="acceptance failed"),
        "S05": SpecRow(state="failed", node="local", ended_at=now - 50, reason="older")}))
    save_state(settings.state_dir, ProjectState(project="dead", pid=2**22 + 12345, specs={
        "S01": SpecRow(state="running", node="local")}))
    drain(drained_store(settings), "local", reason="disk", by="ann@box")
    [output] = run_without_prefect("dispatch.cli.main", "app", ["monitor", "--once", "--json"])
    data = json.loads(output)
    assert data["mode"] == "embedded" and data["team_runs"] is None
    assert data["cooldowns"] is None and "local Prefect server is not running" in data["notes"][0]
    assert data["nodes"][0]["drained"]["reason"] == "disk"
    assert [(r["project"], r["task_id"], r["user"], r["model"]) for r in data["running"]] == [
        ("alpha", "S01", "ann@box", "glm")]  # the dead dispatcher's "running" spec is not running
    assert data["running"][0]["elapsed_s"] >= 90
    projects = {p["project"]: p for p in data["projects"]}
    assert projects["alpha"]["queued"] == 2 and projects["alpha"]["failed"] == 2
    assert projects["dead"]["state"] == "interrupted" and projects["dead"]["running"] == 0
    assert [f["task_id"] for f in data["failures"]] == ["S04", "S05"]  # newest first


def test_team_slot_use_comes_from_the_servers_node_limits(prefect_api, isolated_home: Path):
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from dispatch.cluster.config import load_nodes
    from dispatch.prefect.nodes_admin import sync_pools

    name = f"mon-{uuid.uuid4().hex[:8]}"
    (isolated_home / "home" / "nodes.json").write_text(json.dumps({"nodes": [
        {"name": name, "ssh_host": "gpu.example", "slots": 3}]}))
    settings = get_settings()
    sync_pools(load_nodes(settings))
    try:
        with concurrency(f"node-{name}", occupy=2, strict=True):
            snapshot = take_snapshot(settings)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_work_pool(f"node-{name}")
            client.delete_global_concurrency_limit_by_name(f"node-{name}")
    assert [(n["name"], n["slots"], n["used"], n["load"]) for n in snapshot.nodes] == [(name, 3, 2, None)]
    assert snapshot.notes == []


def test_cost_usd_is_taken_from_the_records_when_they_have_it_and_never_guessed():
    assert cost_usd(SpecRow(state="running", attempts=2)) is None
    assert cost_usd(SimpleNamespace(cost_usd=0.25)) == 0.25
    attempts = [SimpleNamespace(cost_usd=0.5), SimpleNamespace(cost_usd=None), SimpleNamespace(cost_usd=1.25)]
    assert cost_usd(SimpleNamespace(attempts=attempts)) == 1.75
    assert cost_usd(SimpleNamespace(attempts=[SimpleNamespace()])) is None
    reported = [SimpleNamespace(usage=SimpleNamespace(cost_usd=0.125)), SimpleNamespace(usage=None)]
    assert cost_usd(SimpleNamespace(attempts=reported)) == 0.125


def test_the_live_view_refreshes_and_ends_cleanly_on_ctrl_c(isolated_home: Path):
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    primary, secondary = pty.openpty()  # a terminal: rich redraws the view in place there
    view = subprocess.Popen([DISPATCH, "monitor", "--interval", "0.3"], stdin=secondary, stdout=secondary,
                            stderr=secondary, env={**env, "COLUMNS": "160", "TERM": "xterm"}, close_fds=True)
    os.close(secondary)
    seen = b""

    def read(until: float) -> None:
        nonlocal seen
        while time.monotonic() < until and select.select([primary], [], [], 0.1)[0]:
            try:
                seen += os.read(primary, 65536)
            except OSError:  # the view ended and closed the terminal
                return

    try:
        deadline = time.monotonic() + 60
        while seen.count(b"dispatch monitor") < 3 and time.monotonic() < deadline:
            assert view.poll() is None, seen.decode(errors="replace")
            read(time.monotonic() + 0.5)
        assert seen.count(b"dispatch monitor") >= 3, "the view refreshes: " + seen.decode(errors="replace")
        view.send_signal(signal.SIGINT)
        assert view.wait(timeout=30) == 0
        read(time.monotonic() + 1)
    finally:
        if view.poll() is None:
            view.kill()
        os.close(primary)
    assert b"Traceback" not in seen


@pytest.mark.integration
def test_load_of_remote_nodes_is_read_over_ssh_and_an_unreachable_node_has_none(loopback_cluster, isolated_home):
    home = isolated_home / "home"
    nodes = json.loads(Path(loopback_cluster.nodes_json).read_text())["nodes"]
    nodes.append({**nodes[0], "name": "gone", "host": "127.0.0.1", "port": 1})  # nothing listens there
    (home / "nodes.json").write_text(json.dumps({"nodes": nodes}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([DISPATCH, "monitor", "--once", "--json", "--load"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    loads = {n["name"]: n["load"] for n in json.loads(result.stdout)["nodes"]}
    assert loads["gone"] is None
    for name in ("loop1", "loop2", "loop3"):
        assert len(loads[name]) == 3 and all(x >= 0 for x in loads[name]), loads
    plain = _monitor_json(server=False)
    assert [n["load"] for n in plain["nodes"]] == [None] * 4, "without --load, --once connects to no node"


def test_usage_today_sums_the_ledger_per_model_and_user_beside_the_budgets(isolated_home: Path, monkeypatch):
    from dispatch.core.usage import append_ledger, utc_day

    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("DISPATCH_BUDGET_MODEL", '{"claude": 5}')
    get_settings.cache_clear()
    settings = get_settings()
    now = time.time()
    base = {"project": "alpha", "task_id": "S01", "run_id": "r1", "role": "agent", "node": "local"}
    append_ledger(settings.results_dir, [
        {**base, "ts": now - 60, "day": utc_day(now - 60), "user": "ann@box", "model": "claude", "cost_usd": 0.25,
         "input_tokens": 1000, "output_tokens": 200},
        {**base, "ts": now - 30, "day": utc_day(now - 30), "user": "bob@box", "model": "codex",
         "input_tokens": 500, "output_tokens": 50},
        {**base, "ts": now - 3 * 86400, "day": utc_day(now - 3 * 86400), "user": "ann@box", "model": "claude",
         "cost_usd": 9.0},  # an earlier day: not today's
    ], settings.usage_ledger_bytes)
    [output] = run_without_prefect("dispatch.cli.main", "app", ["monitor", "--once", "--json"])
    today = json.loads(output)["usage_today"]
    assert today["attempts"] == 2 and today["attempts_without_cost"] == 1
    assert today["cost_usd"] == pytest.approx(0.25)
    assert today["by_model"]["claude"]["input_tokens"] == 1000
    assert today["by_model"]["codex"]["attempts_without_cost"] == 1  # Codex prints no cost: not counted as spend
    assert set(today["by_user"]) == {"ann@box", "bob@box"}
    assert today["budgets"]["model"]["claude"] == {"limit_usd": 5.0, "spent_usd": pytest.approx(0.25)}
