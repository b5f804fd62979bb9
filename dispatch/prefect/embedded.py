"""The embedded default's Prefect server: a local server that stays, or a temporary one per command.

With no `PREFECT_API_URL`, dispatch runs on Prefect's SQLite database under `DISPATCH_HOME`. By default
(`DISPATCH_SERVER=local`) the first command that needs Prefect starts `prefect server start` in the
background for this home and later commands reuse it, so the UI stays up and a command pays no server
start:

- 127.0.0.1, port `DISPATCH_SERVER_PORT` (4200) when free, else a free one; the UI it serves points at that
  same API (`PREFECT_UI_API_URL`); SQLite under `DISPATCH_HOME/prefect`, concurrency leases on disk,
  telemetry off, its output in `DISPATCH_HOME/logs/prefect-server.log`, its CPU priority 10 below the
  command's (`SERVER_NICE`: under load the dispatcher and the runners go first);
- pid, port, Prefect version and virtualenv in `DISPATCH_HOME/local-server.json`; a command reuses the server after
  one health check; a dead pid, a pid now of another process, a server that does not answer, or another
  Prefect version or virtualenv is replaced (the old one stopped when it is still ours);
- one `flock` (`DISPATCH_HOME/locks/local-server.lock`) around every start, so two commands at once start
  one server; each server carries `DISPATCH_LOCAL_SERVER=<home>` in its environment, so a server of this home
  that the state file no longer names is found and stopped instead of being left behind.

`DISPATCH_SERVER=ephemeral` keeps the temporary server Prefect runs as a child of each command (uvicorn on
127.0.0.1, stopped when the command exits). A command killed with SIGKILL cannot stop it: it lives on,
re-parented to PID 1; the next `dispatch start` on the same `PREFECT_HOME` stops such orphans.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dispatch.core.errors import DispatchError
from dispatch.core.net import free_port, healthy, port_free, wait_healthy
from dispatch.core.polling import attempts
from dispatch.core.processes import carries, carrying, parent_of, pid_alive
from dispatch.core.settings import DispatchSettings

logger = logging.getLogger(__name__)

_SERVER_MARK = "prefect.server.api.server:create_app"
_HOME_MARK = "DISPATCH_LOCAL_SERVER"
_LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
_START_TIMEOUT = 180.0  # a fresh database is migrated first (~10-30 s on a loaded 2-core machine)
_LOCK_TIMEOUT = _START_TIMEOUT + 30
_STOP_TIMEOUT = 20.0
# what the server may inherit besides PREFECT_*: no agent keys or other credentials of ours
_PASS_THROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
                 "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")


class LocalServerError(DispatchError):
    """The local Prefect server could not be started (the message carries its log's tail)."""


@dataclass
class LocalServer:
    """The local Prefect server of one `DISPATCH_HOME`, as its state file records it."""

    pid: int
    port: int
    prefect_version: str
    python_prefix: str  # sys.prefix: the virtualenv whose Prefect it runs
    started_at: float

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def state_path(settings: DispatchSettings) -> Path:
    return settings.home / "local-server.json"


def log_path(settings: DispatchSettings) -> Path:
    return settings.home / "logs" / "prefect-server.log"


def prefect_version() -> str:
    """The installed Prefect's version, without importing Prefect."""
    from importlib.metadata import version

    return version("prefect")


def recorded_server(settings: DispatchSettings) -> LocalServer | None:
    """The server the state file names (alive or not), or None."""
    try:
        return LocalServer(**json.loads(state_path(settings).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _is_ours(pid: int, settings: DispatchSettings) -> bool:
    """Whether `pid` is a live local server of this home (not a process that got its pid later)."""
    return pid_alive(pid) and carries(pid, _HOME_MARK, str(settings.home))


def _problem(server: LocalServer | None, settings: DispatchSettings) -> str | None:
    """Why the recorded server cannot be used (None: it can)."""
    if server is None:
        return "none is running"
    if not _is_ours(server.pid, settings):
        return f"its process {server.pid} is gone"
    if server.prefect_version != prefect_version() or server.python_prefix != sys.prefix:
        return (f"it runs Prefect {server.prefect_version} of {server.python_prefix}, this is Prefect "
                f"{prefect_version()} of {sys.prefix}")
    if not healthy(server.api_url):
        return f"it does not answer on port {server.port}"
    return None


def running_server(settings: DispatchSettings) -> LocalServer | None:
    """This home's local server if it runs, is ours, is current and answers one health check; else None."""
    server = recorded_server(settings)
    return server if _problem(server, settings) is None else None


class _StartLock:
    """The `flock` every start of this home's server holds, so that concurrent commands start one."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.path = settings.locks_dir / "local-server.lock"

    def __enter__(self) -> _StartLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for _ in attempts(_LOCK_TIMEOUT, 0.1):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                pass
        os.close(self._fd)
        raise LocalServerError(f"another command has been starting the local Prefect server for "
                               f"{_LOCK_TIMEOUT:.0f}s (lock {self.path}); see {self.path.parent.parent}"
                               f"/logs/prefect-server.log")

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def ensure_server(settings: DispatchSettings, on_spawned: Callable[[LocalServer], None] | None = None,
                  ) -> tuple[LocalServer, bool]:
    """This home's local server, started when there is none usable; returns (server, started now).

    Args:
        settings: whose home.
        on_spawned: called with a server this call starts as soon as its process runs (its address known),
            before it answers: work that needs no API yet (imports) overlaps the server's start.

    Raises:
        LocalServerError: it did not come up (the message has its log's tail), or another command held the
            start lock too long.
    """
    server = running_server(settings)
    if server is not None:
        return server, False
    with _StartLock(settings):
        server = recorded_server(settings)
        problem = _problem(server, settings)
        if problem is None:  # another command started it while we waited for the lock
            return server, False
        stop_strays(settings)
        logger.info("starting the local Prefect server (%s)", problem)
        return _start(settings, on_spawned), True


def server_environment(settings: DispatchSettings, port: int) -> dict[str, str]:
    """The environment of this home's local server: PREFECT_* of ours but no API URL, and no credential."""
    env = {k: v for k, v in os.environ.items()
           if k in _PASS_THROUGH or k.startswith("LC_")
           or (k.startswith("PREFECT_") and k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"))}
    env.update(settings.prefect_environment())
    api_url = f"http://127.0.0.1:{port}/api"
    env.update({"PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
                "PREFECT_UI_API_URL": api_url, "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": _LEASE_STORAGE,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                _HOME_MARK: str(settings.home)})
    return env


def _start(settings: DispatchSettings, on_spawned: Callable[[LocalServer], None] | None) -> LocalServer:
    """Start a server (the caller holds the start lock) and wait until it answers."""
    port = settings.server_port if port_free(settings.server_port) else free_port()
    log = log_path(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting on 127.0.0.1:{port}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, env=server_environment(settings, port), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _lower_priority(proc.pid)
    server = LocalServer(pid=proc.pid, port=port, prefect_version=prefect_version(), python_prefix=sys.prefix,
                         started_at=time.time())
    _write_state(settings, server)  # first: a command killed while it waits leaves no unnamed server
    if on_spawned is not None:
        on_spawned(server)
    if not wait_healthy(server.api_url, _START_TIMEOUT, 0.1, alive=lambda: proc.poll() is None):
        _stop_pid(proc.pid)
        state_path(settings).unlink(missing_ok=True)
        tail = log.read_text(errors="replace")[-2000:]
        why = f"exited with {proc.returncode}" if proc.returncode is not None else \
            f"did not answer within {_START_TIMEOUT:.0f}s"
        raise LocalServerError(f"the local Prefect server on 127.0.0.1:{port} {why}; its log ({log}) ends:\n"
                               f"{tail}\nset DISPATCH_SERVER=ephemeral to run without it")
    return server


SERVER_NICE = 10
"""How much lower the local server's CPU priority is than the command's that starts it (`nice`).

In embedded mode the server only records what the dispatcher tells it (task-run events, logs: the UI's
view) and is on no path from a spec's end to its dependents' start, yet it was the machine's biggest CPU
user during a run (~0.5 core on 140 loopback slots, more than the dispatcher). When a burst of specs ends
and starts, the dispatcher, its SSH channels and the node runners now get the CPU first and the server's
bookkeeping catches up after; when the machine is not busy the priority changes nothing."""


def _lower_priority(pid: int) -> None:
    """Give the just-started server `SERVER_NICE` (before it starts any thread: its threads inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) + SERVER_NICE)
    except OSError as exc:  # the server still works, at the dispatcher's priority
        logger.debug("could not lower the local server's priority: %s", exc)


def _write_state(settings: DispatchSettings, server: LocalServer) -> None:
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(asdict(server), indent=1), encoding="utf-8")
    partial.replace(path)


def _stop_pid(pid: int) -> None:
    """SIGTERM the server's process group (it leads its own session), SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, _STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        for _ in attempts(wait, 0.05):
            try:  # reap it when it is our child (a server started by this same process)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return


def stop_strays(settings: DispatchSettings) -> list[int]:
    """Stop every server process of this home (its environment carries the home's mark); returns their pids."""
    candidates = carrying(_HOME_MARK, str(settings.home))
    for pid in candidates:
        _stop_pid(pid)
    return candidates


def stop_server(settings: DispatchSettings) -> list[int]:
    """Stop this home's local server (and any other of this home); returns the pids stopped."""
    with _StartLock(settings):
        stopped = stop_strays(settings)
        state_path(settings).unlink(missing_ok=True)
    return stopped


def prepare_prefect(settings: DispatchSettings, verbose: bool = False, meanwhile: Callable[[], object] | None = None,
                    ) -> tuple[str | None, LocalServer | None]:
    """Set this process's environment for Prefect, before Prefect is imported.

    Team mode and `DISPATCH_SERVER=ephemeral` only set Prefect's settings; embedded `local` mode also starts
    (or reuses) this home's local server and points PREFECT_API_URL at it.

    Args:
        settings: the process's settings.
        verbose: Prefect's console logs at INFO (else WARNING).
        meanwhile: called once the environment is set (importing Prefect is then safe), while a server this
            call starts is still starting.

    Returns:
        The UI's base URL when the run will still be visible there after this command (None for a temporary
        server), and the local server when this call started it (else None).

    Raises:
        LocalServerError: the local server could not be started.
    """
    os.environ.update(settings.prefect_environment(verbose=verbose))
    if not settings.embedded or settings.server == "ephemeral":
        if settings.embedded:  # a PREFECT_API_URL here can only be a local server's, not wanted now
            os.environ.pop("PREFECT_API_URL", None)
        if meanwhile is not None:
            meanwhile()
        if settings.embedded:
            return None, None
        from dispatch.prefect.team import ui_base_url

        return ui_base_url(settings.prefect_api_url or ""), None

    def point_at(server: LocalServer) -> None:
        os.environ.update({"PREFECT_API_URL": server.api_url, "DISPATCH_LOCAL_API_URL": server.api_url,
                           "PREFECT_UI_URL": server.ui_url})
        if meanwhile is not None:
            meanwhile()

    server, started = ensure_server(settings, on_spawned=point_at)
    if not started:
        point_at(server)
    return server.ui_url, server if started else None


def orphaned_servers(prefect_home: str) -> list[int]:
    """Pids of temporary Prefect servers under `prefect_home` whose dispatcher is gone (parent PID 1).

    A server whose parent lives (another dispatcher's, or one under a subreaper) is never listed.
    """
    servers = carrying("PREFECT_HOME", prefect_home, cmdline_has=_SERVER_MARK)
    return [pid for pid in servers if parent_of(pid) == 1]


def reap_orphaned_servers(prefect_home: str) -> list[int]:
    """Stop (SIGTERM) the orphaned temporary servers under `prefect_home`; returns their pids."""
    stopped = []
    for pid in orphaned_servers(prefect_home):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as exc:
            logger.warning("could not stop the orphaned Prefect server %d: %s", pid, exc)
            continue
        stopped.append(pid)
    return stopped
