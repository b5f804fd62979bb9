"""Shared test set-up: a real Prefect server for the session, and an isolated home for every test.

The Prefect server (SQLite, loopback, its own PREFECT_HOME) starts in the background when pytest
starts, so unit tests never wait for it; tests that need it take the `prefect_api` fixture, which
waits until it answers. Every test gets its own DISPATCH_HOME, DISPATCH_SPECS, DISPATCH_PROJECTS and
HOME, so nothing reads or writes the user's real state or ~/.ssh/config.

`bash .ci/run` runs the suite on two pytest-xdist workers (`-n 2`): each worker is a session of its own (its
Prefect server, sshd cluster and PostgreSQL server on free loopback ports); the controller starts none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dispatch.net import free_port, wait_healthy

pytest_plugins = ["tests.fixtures.sshd", "tests.fixtures.postgres"]  # sshd cluster, PostgreSQL + team server

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="dispatch-tests-"))
_SERVER: dict = {}


def pytest_configure(config: pytest.Config) -> None:
    """Point Prefect at a session server before anything imports Prefect, and start that server."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the controller of `pytest -n N` runs no test: its workers start their own servers
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(_SESSION_DIR / "prefect-client"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SESSION_DIR / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    os.environ.update(env)
    server_env = {**os.environ, "PREFECT_HOME": str(_SESSION_DIR / "prefect-server"), "PREFECT_UI_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL")
    log = open(_SESSION_DIR / "prefect-server.log", "wb")  # noqa: SIM115 - lives for the session
    _SERVER.update(url=url, log=log, proc=subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))


def pytest_unconfigure(config: pytest.Config) -> None:
    proc = _SERVER.get("proc")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        _SERVER["log"].close()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The session's Prefect API URL, once the server answers its health check."""
    if wait_healthy(_SERVER["url"], 180, 0.5, alive=lambda: _SERVER["proc"].poll() is None):
        return _SERVER["url"]
    log = (_SESSION_DIR / "prefect-server.log").read_text(errors="replace")[-3000:]
    pytest.fail(f"the test Prefect server did not start; its log:\n{log}")


@pytest.fixture(scope="session")
def prefect_database(prefect_api: str) -> list[Path]:
    """The session server's SQLite database files (the database and its WAL), to search for leaks."""
    return sorted((_SESSION_DIR / "prefect-server").glob("*.db*"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DISPATCH_HOME/SPECS/PROJECTS and HOME per test; settings re-read."""
    from dispatch.settings import get_settings

    for name in ("home", "specs", "projects", "user-home"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DISPATCH_SPECS", str(tmp_path / "specs"))
    monkeypatch.setenv("DISPATCH_PROJECTS", str(tmp_path / "projects"))
    monkeypatch.setenv("DISPATCH_RETRY_DELAY", "0.2")
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    get_settings.cache_clear()
    yield tmp_path
    if (tmp_path / "home" / "locks" / "local-server.lock").exists():  # a command started the home's local server
        from dispatch.embedded import stop_strays

        stop_strays(get_settings())
    get_settings.cache_clear()


@pytest.fixture
def run_project(prefect_api, monkeypatch):
    """Run a project's flow in this process; returns (final Prefect state, our ProjectState)."""
    from dispatch.results import load_state
    from dispatch.settings import get_settings
    from flows.dispatch_project import dispatch_project

    def run(project: str, slots: int = 2, **options):
        monkeypatch.setenv("DISPATCH_LOCAL_SLOTS", str(slots))
        get_settings.cache_clear()
        state = dispatch_project(project, return_state=True, **options)
        return state, load_state(get_settings().state_dir, project)

    return run


@pytest.fixture
def fake_agents(prefect_api, isolated_home: Path, monkeypatch):
    """The fake agent CLI as `claude` and `codex` on PATH, and no model cool-down before or after (they are
    shared through the session's Prefect server)."""
    from prefect.variables import Variable

    fakebin = isolated_home / "fakebin"
    fakebin.mkdir(exist_ok=True)
    for name in ("claude", "codex"):
        (fakebin / name).symlink_to(Path(__file__).parent / "fixtures" / "fake_agent.py")
    monkeypatch.setenv("PATH", f"{fakebin}:/usr/bin:/bin")
    models = ("glm", "minimax", "claude", "codex")
    for model in models:
        Variable.unset(f"dispatch_cooldown_{model}")
    yield
    for model in models:
        Variable.unset(f"dispatch_cooldown_{model}")
