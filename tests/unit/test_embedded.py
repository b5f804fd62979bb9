"""Orphaned temporary Prefect servers (dispatch/prefect/embedded.py), with real processes standing in for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dispatch.prefect.embedded import orphaned_servers, reap_orphaned_servers

# a process whose command line carries the server's marker; it only sleeps
_FAKE_SERVER = [sys.executable, "-c", "import time; time.sleep(120)", "--factory",
                "prefect.server.api.server:create_app"]


def _orphan(home: Path, pidfile: Path) -> int:
    """Start a fake server whose parent exits at once, so that it is re-parented to PID 1."""
    launcher = ("import os, subprocess, sys; "
                f"p = subprocess.Popen({_FAKE_SERVER!r}, start_new_session=True); "
                f"open({str(pidfile)!r}, 'w').write(str(p.pid))")
    subprocess.run([sys.executable, "-c", launcher], env={**os.environ, "PREFECT_HOME": str(home)}, check=True)
    return int(pidfile.read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_only_orphaned_servers_of_this_home_are_stopped(tmp_path: Path):
    ours, other = tmp_path / "ours" / "prefect", tmp_path / "other" / "prefect"
    orphan = _orphan(ours, tmp_path / "orphan.pid")
    foreign = _orphan(other, tmp_path / "foreign.pid")
    parented = subprocess.Popen(_FAKE_SERVER, env={**os.environ, "PREFECT_HOME": str(ours)})
    try:
        assert Path(f"/proc/{orphan}/status").read_text().count("PPid:\t1\n") == 1, "the orphan's parent is not PID 1"
        assert orphaned_servers(str(ours)) == [orphan]
        assert reap_orphaned_servers(str(ours)) == [orphan]
        deadline = time.monotonic() + 10
        while _alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(orphan), "the orphaned server was not stopped"
        assert _alive(foreign), "a server of another PREFECT_HOME was stopped"
        assert parented.poll() is None, "a server whose dispatcher lives was stopped"
        assert reap_orphaned_servers(str(ours)) == []
    finally:
        parented.kill()
        parented.wait()
        for pid in (orphan, foreign):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_prefect_api_url_of_this_homes_local_server_is_still_embedded_mode(monkeypatch):
    """A dispatch process started by one that uses the local server inherits PREFECT_API_URL: not team mode."""
    from dispatch.core.settings import DispatchSettings

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("DISPATCH_LOCAL_API_URL", "http://127.0.0.1:4200/api")
    settings = DispatchSettings()
    assert settings.embedded and settings.prefect_api_url is None
    monkeypatch.setenv("PREFECT_API_URL", "http://gateway:4200/api")  # the user's server: team mode
    assert DispatchSettings().prefect_api_url == "http://gateway:4200/api"
