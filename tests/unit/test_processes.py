"""The dispatcher's process scans through psutil (dispatch/core/processes.py, `pid_alive`), on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.core.polling import wait_until
from dispatch.core.processes import carries, carrying, environ_of, parent_of, pid_alive
from dispatch.core.settings import DispatchSettings
from dispatch.pipeline.app import MARKER, reap_orphans
from dispatch.prefect.embedded import stop_strays

_SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    """Processes the test starts; every one is killed and reaped at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def _sleeper(started: list[subprocess.Popen], **env: str) -> subprocess.Popen:
    process = subprocess.Popen(_SLEEPER, env={**os.environ, **env}, start_new_session=True)
    started.append(process)
    return process


def test_pid_alive_tells_a_live_pid_from_a_dead_one_and_a_zombie(sleepers):
    live = _sleeper(sleepers)
    assert pid_alive(os.getpid()) and pid_alive(live.pid)
    live.kill()  # not reaped yet: a zombie until wait()
    wait_until(lambda: not pid_alive(live.pid), timeout=10, interval=0.02, what="the killed child to be a zombie")
    assert Path(f"/proc/{live.pid}").exists(), "the zombie is still in the process table"
    live.wait()
    assert not pid_alive(live.pid)
    assert not pid_alive(0) and not pid_alive(-5)


def test_environment_marks_are_read_exactly(sleepers, tmp_path: Path):
    home = str(tmp_path / "home")
    marked = _sleeper(sleepers, DISPATCH_LOCAL_SERVER=home)
    lookalike = _sleeper(sleepers, OLD_DISPATCH_LOCAL_SERVER=home)  # another variable ending in the same name
    wait_until(lambda: environ_of(marked.pid) and environ_of(lookalike.pid), timeout=10, interval=0.02,
               what="the children's environments")
    assert environ_of(marked.pid)["DISPATCH_LOCAL_SERVER"] == home
    assert carries(marked.pid, "DISPATCH_LOCAL_SERVER", home)
    assert not carries(marked.pid, "DISPATCH_LOCAL_SERVER", home + "-2")
    assert not carries(lookalike.pid, "DISPATCH_LOCAL_SERVER", home)
    assert carrying("DISPATCH_LOCAL_SERVER", home) == [marked.pid]
    assert parent_of(marked.pid) == os.getpid()


def test_a_gone_process_has_no_environment_and_no_parent(sleepers):
    gone = _sleeper(sleepers, DISPATCH_LOCAL_SERVER="/x")
    gone.kill()
    gone.wait()
    assert environ_of(gone.pid) == {} and parent_of(gone.pid) is None
    assert not carries(gone.pid, "DISPATCH_LOCAL_SERVER", "/x")
    assert environ_of(-1) == {} and parent_of(-1) is None


def test_carrying_checks_the_command_line_first(sleepers, tmp_path: Path):
    plain = _sleeper(sleepers, PREFECT_HOME=str(tmp_path))
    assert carrying("PREFECT_HOME", str(tmp_path)) == [plain.pid]
    assert carrying("PREFECT_HOME", str(tmp_path), cmdline_has="prefect.server.api.server:create_app") == []


def test_stop_strays_stops_only_this_homes_servers(sleepers, tmp_path: Path):
    settings = DispatchSettings(home=tmp_path / "home")
    ours = _sleeper(sleepers, DISPATCH_LOCAL_SERVER=str(settings.home))
    lookalike = _sleeper(sleepers, OLD_DISPATCH_LOCAL_SERVER=str(settings.home))
    other = _sleeper(sleepers, DISPATCH_LOCAL_SERVER=str(tmp_path / "other"))
    assert stop_strays(settings) == [ours.pid]
    assert ours.wait(timeout=10) is not None
    assert lookalike.poll() is None and other.poll() is None


def test_reap_orphans_stops_only_a_group_that_carries_its_runs_marker(sleepers, tmp_path: Path):
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    ours = _sleeper(sleepers, **{MARKER: "run-1"})
    stranger = _sleeper(sleepers, **{MARKER: "run-10"})  # a recycled pid: another run's process
    for run, pid in (("a", ours.pid), ("b", stranger.pid)):
        (tmp_path / run / "L3").mkdir(parents=True)
        (tmp_path / run / "L3" / "app.pid").write_text(f"{pid}\nrun-1\n{dead_owner.pid}\n", encoding="utf-8")
    started = time.monotonic()
    assert reap_orphans(tmp_path) == [ours.pid]
    assert time.monotonic() - started < 10
    assert ours.wait(timeout=10) is not None and stranger.poll() is None
    assert not list(tmp_path.glob("*/L3/app.pid"))
