"""Shared test set-up: a real Prefect server for the sessions that need one, and an isolated home for every test.

The Prefect server (SQLite, loopback, its own PREFECT_HOME) starts in the background as early as pytest knows a
test of the session needs it: at start-up unless every path asked for is under tests/unit, else once collection
finds a test that takes the `prefect_api` fixture (directly or through another) or lies outside tests/unit or is
marked `prefect`/`integration`. Tests that need it take `prefect_api`, which waits until it answers. A session
that needs none (`pytest tests/unit`) starts none: its PREFECT_API_URL is a loopback port this process holds
bound without listening, so a unit test that talks to Prefect by mistake is refused at once instead of reaching
a real server or starting an ephemeral one. Every test gets its own DISPATCH_HOME, DISPATCH_SPECS,
DISPATCH_PROJECTS and HOME, so nothing reads or writes the user's real state or ~/.ssh/config.

`bash .ci/run` runs the suite on two pytest-xdist workers (`-n 2`): each worker is a session of its own (its
Prefect server, sshd cluster and PostgreSQL server on free loopback ports); the controller starts none.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dispatch.core.net import wait_healthy

# sshd cluster, PostgreSQL + team server, fake node transports
pytest_plugins = ["tests.fixtures.sshd", "tests.fixtures.postgres", "tests.fixtures.fake_transport"]

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="dispatch-tests-"))
_UNIT_DIR = Path(__file__).parent / "unit"
_SERVER: dict = {}
_SERVER_MARKS = ("prefect", "integration")


def pytest_configure(config: pytest.Config) -> None:
    """Point Prefect at a session server before anything imports Prefect; start it now unless only unit tests
    were asked for."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the controller of `pytest -n N` runs no test: its workers start their own servers
    hold = socket.socket()  # bound, never listening: the port refuses connections until the server takes it
    hold.bind(("127.0.0.1", 0))
    port = hold.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    os.environ.update({
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(_SESSION_DIR / "prefect-client"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SESSION_DIR / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    })
    _SERVER.update(url=url, port=port, hold=hold)
    if not _only_unit_paths(config):
        _start_server()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the server when a collected test needs it and it is not running; stop one started for nothing."""
    if "port" not in _SERVER:
        return  # the xdist controller
    if any(_needs_server(item) for item in items):
        _start_server()
    else:
        _stop_server()


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_server()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def _only_unit_paths(config: pytest.Config) -> bool:
    """Whether every path on the command line lies in tests/unit (none: the whole suite, `testpaths`)."""
    if not config.args:
        return False
    root = Path(config.invocation_params.dir)
    return all((root / arg.split("::")[0]).resolve().is_relative_to(_UNIT_DIR) for arg in config.args)


def _needs_server(item: pytest.Item) -> bool:
    """A test outside tests/unit, marked `prefect`/`integration`, or taking `prefect_api` (directly or not)."""
    return (not item.path.is_relative_to(_UNIT_DIR) or "prefect_api" in getattr(item, "fixturenames", ())
            or any(item.get_closest_marker(mark) for mark in _SERVER_MARKS))


def _start_server() -> None:
    """Start the session's Prefect server in the background on the held port (once)."""
    if "proc" in _SERVER:
        return
    _SERVER.pop("hold").close()
    server_env = {**os.environ, "PREFECT_HOME": str(_SESSION_DIR / "prefect-server"), "PREFECT_UI_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL")
    log = open(_SESSION_DIR / "prefect-server.log", "wb")  # noqa: SIM115 - lives for the session
    _SERVER.update(log=log, proc=subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_SERVER["port"])],
        env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))


def _stop_server() -> None:
    """Stop the session's server if it runs (bounded), and give back the held port otherwise."""
    if (hold := _SERVER.pop("hold", None)) is not None:
        hold.close()
    proc = _SERVER.pop("proc", None)
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)
    _SERVER.pop("log").close()


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The session's Prefect API URL, once the server answers its health check."""
    if "proc" not in _SERVER:
        pytest.fail("no Prefect server was started for this session (tests/conftest.py _needs_server)")
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
    from dispatch.core.settings import get_settings

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
        from dispatch.prefect.embedded import stop_strays

        stop_strays(get_settings())
    get_settings.cache_clear()


@pytest.fixture
def run_project(prefect_api, monkeypatch):
    """Run a project's flow in this process; returns (final Prefect state, our ProjectState)."""
    from dispatch.core.results import load_state
    from dispatch.core.settings import get_settings
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
