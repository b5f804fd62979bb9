"""The embedded default's local Prefect server (dispatch/prefect/embedded.py), as users meet it through `dispatch`.

Real `dispatch` processes with no PREFECT_* in their environment, a real `prefect server start` in the
background. The module shares one DISPATCH_HOME (a fresh database is migrated once); every test first makes
sure of the server it needs and leaves one behind for the next, and the module ends with `dispatch server
stop`. Ports are the module's own (DISPATCH_SERVER_PORT), never 4200, so a user's server is left alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dispatch.core.net import free_port
from dispatch.core.processes import pid_alive
from tests.fixtures.local_server import LocalHome, headless_page, marked_servers
from tests.fixtures.projects import DISPATCH, shell_spec

pytestmark = [pytest.mark.prefect, pytest.mark.integration]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(0.05)


def test_commands_share_one_local_server_whose_ui_points_at_it(local_home: LocalHome):
    url = local_home.ui()
    pid = local_home.state()["pid"]
    again = local_home.run("ui")
    assert again.returncode == 0 and again.stdout.strip() == url
    assert "started" not in again.stderr, "a running server was started again"
    assert local_home.state()["pid"] == pid
    status = local_home.run("server", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["running"] and data["pid"] == pid and data["ui_url"] == url
    assert _get(f"{url}/ui-settings")[1] and json.loads(_get(f"{url}/ui-settings")[1])["api_url"] == f"{url}/api"
    assert marked_servers(local_home.home) == [pid]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem" in environ
    assert b"PREFECT_SERVER_ANALYTICS_ENABLED=false" in environ
    assert (local_home.home / "logs" / "prefect-server.log").exists()
    assert list((local_home.home / "prefect").glob("*.db")), "its SQLite database is under DISPATCH_HOME"
    # the server gives way to the dispatcher and the runners under load: every thread of it, nice +10
    lowered = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    for task in Path(f"/proc/{pid}/task").iterdir():
        nice = int((task / "stat").read_text().rpartition(")")[2].split()[16])
        assert nice == lowered, f"server thread {task.name} runs at nice {nice}, not {lowered}"


def test_ui_open_hands_the_address_to_the_browser(local_home: LocalHome, tmp_path: Path):
    opened = tmp_path / "opened"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" >> {opened}\n')
    browser.chmod(0o755)
    result = local_home.run("ui", "--open", BROWSER=str(browser))
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 10  # webbrowser may run it in the background
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened.read_text().strip() == result.stdout.strip() == f"http://127.0.0.1:{local_home.state()['port']}"


def test_a_killed_server_is_replaced(local_home: LocalHome):
    local_home.ui()
    old = local_home.state()["pid"]
    os.kill(old, signal.SIGKILL)
    _wait_dead(old)
    url = local_home.ui()
    new = local_home.state()["pid"]
    assert new != old and pid_alive(new)
    assert _get(f"{url}/api/health")[0] == 200
    assert marked_servers(local_home.home) == [new]


class _Impostor(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"true"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _impostor_on(port: int) -> ThreadingHTTPServer:
    """Another program serving on `port` (answering 200 to /api/health too), once the kernel lets it bind."""
    deadline = time.monotonic() + 30
    while True:
        try:
            impostor = ThreadingHTTPServer(("127.0.0.1", port), _Impostor)
            break
        except OSError:  # the killed server's sockets can hold the port a moment longer
            assert time.monotonic() < deadline, f"port {port} stayed busy after the server was killed"
            time.sleep(0.2)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    return impostor


def test_a_port_taken_by_another_program_is_left_to_it(local_home: LocalHome):
    local_home.ui()
    old = local_home.state()
    os.kill(old["pid"], signal.SIGKILL)
    _wait_dead(old["pid"])
    impostor = _impostor_on(old["port"])
    try:
        url = local_home.ui()
        new = local_home.state()
        assert new["port"] != old["port"] and url == f"http://127.0.0.1:{new['port']}"
        assert json.loads(_get(f"{url}/ui-settings")[1])["api_url"] == f"{url}/api"
        assert _get(f"http://127.0.0.1:{old['port']}/api/health")[1] == b"true", "the other program lost its port"
        assert marked_servers(local_home.home) == [new["pid"]]
    finally:
        impostor.shutdown()
        impostor.server_close()


def test_another_prefect_version_replaces_the_server(local_home: LocalHome):
    local_home.ui()
    state = local_home.state()
    (local_home.home / "local-server.json").write_text(json.dumps({**state, "prefect_version": "3.0.0"}))
    local_home.ui()
    new = local_home.state()
    assert new["pid"] != state["pid"] and new["prefect_version"] != "3.0.0"
    _wait_dead(state["pid"])  # stopped, not left running beside the new one
    assert marked_servers(local_home.home) == [new["pid"]]


def test_a_recorded_pid_and_port_now_of_other_programs_are_neither_used_nor_stopped(local_home: LocalHome):
    local_home.ui()
    state = local_home.state()
    assert local_home.run("server", "stop").returncode == 0
    other = subprocess.Popen(["sleep", "120"])  # the recorded pid, handed to another program
    impostor = _impostor_on(state["port"])  # and the port, answering health
    try:
        (local_home.home / "local-server.json").write_text(json.dumps({**state, "pid": other.pid}))
        url = local_home.ui()
        assert local_home.state()["pid"] not in (other.pid, state["pid"])
        assert url != f"http://127.0.0.1:{state['port']}", "the other program's port was taken for the server"
        assert json.loads(_get(f"{url}/ui-settings")[1])["api_url"] == f"{url}/api"
        assert other.poll() is None, "a process that is not the server was stopped"
    finally:
        other.kill()
        other.wait()
        impostor.shutdown()
        impostor.server_close()


def test_two_commands_at_once_start_one_server(local_home: LocalHome):
    assert local_home.run("server", "stop").returncode == 0
    assert marked_servers(local_home.home) == []
    procs = [subprocess.Popen([DISPATCH, "ui"], env=local_home.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1, outputs
    assert sum("started the local Prefect server" in err for _, err in outputs) == 1, outputs
    assert marked_servers(local_home.home) == [local_home.state()["pid"]]


def test_server_stop_stops_it(local_home: LocalHome):
    local_home.ui()
    pid = local_home.state()["pid"]
    stopped = local_home.run("server", "stop")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not pid_alive(pid) and not (local_home.home / "local-server.json").exists()
    assert marked_servers(local_home.home) == []
    status = local_home.run("server", "status")
    assert status.returncode == 1 and "no local Prefect server" in status.stdout
    again = local_home.run("server", "stop")
    assert again.returncode == 0 and "no local Prefect server was running" in again.stdout


def test_start_prints_the_flow_runs_ui_address_and_the_server_stays(local_home: LocalHome):
    shell_spec(local_home.specs / "shown", "S01-one", local_home.home.parent / "timeline", seconds=0.1)
    result = local_home.run("start", "shown")
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads((local_home.home / "state" / "shown.json").read_text())
    url = f"http://127.0.0.1:{local_home.state()['port']}/runs/flow-run/{run['flow_run_id']}"
    lines = result.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if url in line]
    assert len(at) == 2, result.stdout  # when it begins and in the summary
    assert at[0] < next(i for i, line in enumerate(lines) if "S01-one" in line) < at[1], result.stdout
    assert pid_alive(local_home.state()["pid"]), "the local server went away with the command"
    status, body = _get(f"http://127.0.0.1:{local_home.state()['port']}/api/flow_runs/{run['flow_run_id']}")
    assert status == 200 and json.loads(body)["name"] == "shown"


def test_a_specs_log_lines_reach_the_ui_while_it_runs(local_home: LocalHome, tmp_path: Path):
    go_on = tmp_path / "go-on"
    script = (f"echo 'halfway there'\nfor i in $(seq 600); do [ -e {go_on} ] && break; sleep 0.1; done\n"
              f"[ -e {go_on} ]\n")
    (local_home.specs / "streamy").mkdir()
    (local_home.specs / "streamy" / "S01-wait.md").write_text(
        f"---\ntask_id: S01-wait\nkind: shell\n---\n## Goal\nWait.\n\n```bash\n{script}```\n")
    api = local_home.ui() + "/api"
    run = subprocess.Popen([DISPATCH, "start", "streamy"], env=local_home.env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert run.poll() is None and time.monotonic() < deadline, "no log line while the spec ran"
            state = local_home.home / "state" / "streamy.json"
            flow_run_id = json.loads(state.read_text()).get("flow_run_id") if state.exists() else None
            if flow_run_id:
                request = urllib.request.Request(
                    f"{api}/logs/filter", method="POST", headers={"Content-Type": "application/json"},
                    data=json.dumps({"logs": {"flow_run_id": {"any_": [flow_run_id]}}}).encode())
                with urllib.request.urlopen(request, timeout=10) as response:
                    logs = json.loads(response.read())
                if any("S01-wait: halfway there" in log["message"] and log["task_run_id"] for log in logs):
                    break
            time.sleep(0.5)
        assert run.poll() is None, "the spec ended before its line was seen"
    finally:
        go_on.touch()
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out


def test_the_ephemeral_setting_keeps_a_temporary_server(tmp_path: Path):
    home = LocalHome(tmp_path / "ephemeral")
    shell_spec(home.specs / "brief", "S01-one", tmp_path / "timeline", seconds=0.1)
    result = home.run("start", "brief", DISPATCH_SERVER="ephemeral")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "brief completed" in result.stdout and "/runs/flow-run/" not in result.stdout
    assert not (home.home / "local-server.json").exists() and marked_servers(home.home) == []
    ui = home.run("ui", DISPATCH_SERVER="ephemeral")
    assert ui.returncode == 2 and "DISPATCH_SERVER=ephemeral" in ui.stderr


def test_team_server_start_serves_a_ui_that_points_at_its_own_port(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["DISPATCH_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen([DISPATCH, "server", "start", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                status, body = _get(f"http://127.0.0.1:{port}/ui-settings")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        assert json.loads(body)["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_the_browser_shows_the_demos_spec_runs_and_report(local_home: LocalHome):
    """Real headless Chromium (Debian's package) on the demo's flow run page in the local server's UI."""
    env_specs = {k: v for k, v in local_home.env().items() if k != "DISPATCH_SPECS"}  # the bundled demo
    result = subprocess.run([DISPATCH, "start", "demo"], env=env_specs, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    url = re.search(r"http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}", result.stdout).group(0)
    specs = ["S01-setup", "S02-api", "S03-db", "S04-docs", "S05-lint", "S06-tests", "S07-package"]
    with headless_page() as page:
        page.goto(url)
        page.get_by_text("Task Runs", exact=True).first.click()
        for spec in specs:
            page.get_by_text(spec, exact=True).first.wait_for(timeout=30_000)
        assert "Can't connect" not in page.inner_text("body")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("report-demo", exact=True).first.click()
        page.get_by_text("Oyster Dispatch report: demo").first.wait_for(timeout=30_000)
        links = page.locator("a[href*='/runs/task-run/']")
        assert sorted(links.all_inner_texts()) == specs


def test_the_monitor_reads_cool_downs_from_the_running_local_server_and_starts_none(local_home: LocalHome):
    url = local_home.ui()  # the module's server, running
    until = time.time() + 1800
    cooldown = {"model": "glm", "kind": "quota", "until": until, "reason": "GLM 1308: 5-hour cap", "by": "ann@box"}
    request = urllib.request.Request(f"{url}/api/variables/", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"name": "dispatch_cooldown_glm", "value": cooldown}).encode())
    urllib.request.urlopen(request, timeout=10).read()
    result = local_home.run("monitor", "--once", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["mode"] == "embedded" and data["prefect_api_url"] == f"{url}/api"
    assert [(c["model"], c["state"], c["reason"]) for c in data["cooldowns"]] == [
        ("glm", "cooling", "GLM 1308: 5-hour cap")]
    assert data["cooldowns"][0]["until"] == pytest.approx(until)
    pid = local_home.state()["pid"]
    local_home.run("server", "stop")
    _wait_dead(pid)
    stopped = local_home.run("monitor", "--once", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["cooldowns"] is None
    assert not marked_servers(local_home.home), "a read-only view starts no server"
