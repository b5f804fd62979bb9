"""The CLI's team-mode additions where no team server is needed: `dispatch start --detach` in embedded mode
(a real background `dispatch start` on the embedded Prefect), `dispatch status` never importing Prefect when
embedded, and an unreachable server named in one warning while the local part still prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatch.core.net import free_port
from dispatch.core.processes import pid_alive
from dispatch.core.results import load_state
from tests.fixtures.projects import DISPATCH, read_timeline, shell_spec

pytestmark = pytest.mark.prefect


def _embedded_env(home: Path, **extra: str) -> dict[str, str]:
    """No PREFECT_* at all: dispatch runs embedded, with its Prefect under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "DISPATCH_HOME": str(home), "COLUMNS": "250", **extra}


def test_status_in_embedded_mode_never_imports_prefect(isolated_home: Path) -> None:
    code = ("import sys\nfrom dispatch.cli.main import app\ntry:\n    app(['status'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    result = subprocess.run([sys.executable, "-c", code], env=_embedded_env(isolated_home / "home"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_status_names_an_unreachable_server_and_still_shows_this_machine(isolated_home: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    env = _embedded_env(isolated_home / "home", PREFECT_API_URL=url)
    plain = subprocess.run([DISPATCH, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.count("\n") == 1 and "cannot reach" in plain.stderr and url in plain.stderr, plain.stderr
    assert "local" in plain.stdout, "the node table of this machine still prints"
    as_json = subprocess.run([DISPATCH, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0 and url in as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["team_runs"] is None and "local" in data["nodes"]


@pytest.mark.integration
def test_detach_in_embedded_mode_runs_the_project_in_the_background(isolated_home: Path) -> None:
    specs, timeline = isolated_home / "specs" / "bg", isolated_home / "timeline"
    shell_spec(specs, "S01-one", timeline, seconds=0.2)
    shell_spec(specs, "S02-two", timeline, seconds=0.2, depends_on=["S01"])
    home = isolated_home / "home"
    began = time.monotonic()
    started = subprocess.run([DISPATCH, "start", "bg", "--detach"], env=_embedded_env(home), capture_output=True,
                             text=True, timeout=60)
    took = time.monotonic() - began
    assert started.returncode == 0, started.stdout + started.stderr
    assert took < 5, f"--detach took {took:.1f} s; it must not wait for the run"
    pid = int(re.search(r"pid (\d+)", started.stdout).group(1))
    logs = list((home / "logs").glob("bg-*.log"))
    assert len(logs) == 1 and str(logs[0]) in started.stdout.replace("\n", ""), started.stdout
    assert "dispatch status bg" in started.stdout
    if pid_alive(pid):
        assert os.getsid(pid) == pid, "the background run has its own session (it outlives the terminal)"

    deadline = time.monotonic() + 300  # a fresh embedded Prefect migrates its database first
    while (state := load_state(home / "state", "bg")) is None or state.state == "running":
        assert time.monotonic() < deadline, logs[0].read_text(errors="replace")
        time.sleep(0.5)
    assert state.state == "completed", logs[0].read_text(errors="replace")
    assert set(read_timeline(timeline)) == {"S01-one", "S02-two"}
    deadline = time.monotonic() + 60
    while pid_alive(pid):
        assert time.monotonic() < deadline, "the background dispatcher did not exit"
        time.sleep(0.2)
    assert "bg completed" in logs[0].read_text(errors="replace")
