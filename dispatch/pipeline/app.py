"""The app under test: started on a free loopback port in its own process group, health-polled, stopped.

L3 starts it and registers it under the pipeline run's directory; L4 tests it; the pipeline stops it
(its whole process group, never "whatever listens on the port") when it leaves L4, on success, failure and
cancellation. A server is a process that must outlive the step that starts it, so it is a `Popen` of
ours rather than a shell step. Its output reaches its log (`<run_dir>/L3/backend.log`) through a thread of
ours that masks every line with the pipeline's `Masker` first: a key the app prints is never written.

A process group left behind by a dispatcher that was killed outright is found by the pid file each app
leaves in its run directory and stopped by the next run of the same project (`reap_orphans`), after
checking that the process still carries that run's marker in its environment.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from dispatch.core.errors import ConfigError
from dispatch.core.processes import carries, pid_alive
from dispatch.pipeline.deploy import wait_healthy
from dispatch.pipeline.masking import pipeline_masker
from dispatch.pipeline.shell import masked_lines, signal_group, stop_group

MARKER = "DISPATCH_PIPELINE_APP"
_POLL = 0.2
_STOP_GRACE = 5.0
_running: dict[str, list[AppProcess]] = {}
_lock = threading.Lock()


def health_url(health: str, port: int) -> str:
    """The URL to poll: a path on the started app, or an absolute URL that must stay on loopback.

    Raises:
        ConfigError: an absolute URL to another host (the pipeline only probes its own app).
    """
    if health.startswith("/"):
        return f"http://127.0.0.1:{port}{health}"
    host = urlsplit(health).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or urlsplit(health).scheme not in ("http", "https"):
        raise ConfigError(f"backend.health: {health[:120]!r} must be a path such as /healthz or a loopback URL")
    return health.replace("{port}", str(port))


class AppProcess:
    """One started app (a shell command in its own session), its port and its log.

    Args:
        command: the start command, `{port}` already replaced.
        cwd: where it runs.
        env: its whole environment.
        port: the loopback port it was told to serve on.
        log_path: where its stdout and stderr go.
        marker: a value for `DISPATCH_PIPELINE_APP`, to recognise it later (the run directory).
    """

    def __init__(self, command: str, *, cwd: Path, env: dict[str, str], port: int, log_path: Path,
                 marker: str) -> None:
        self.command, self.port, self.log_path = command, port, log_path
        self.masker = pipeline_masker()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd,
                                        env={**env, "PORT": str(port), MARKER: marker},
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.pgid = self.process.pid  # start_new_session: the leader's pid is the group's id
        self._relay = threading.Thread(target=self._write_log, daemon=True, name=f"app-log-{port}")
        self._relay.start()
        self.url = f"http://127.0.0.1:{port}"
        (log_path.parent / "app.pid").write_text(f"{self.pgid}\n{marker}\n{os.getpid()}\n", encoding="utf-8")

    def _write_log(self) -> None:
        """Copy the app's output into its log, line by line, masked (ends when the app's group is gone)."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in masked_lines(self.process.stdout, self.masker):
                log.write(line + "\n")
                log.flush()

    def exit_code(self) -> int | None:
        """Its exit status once it has exited, else None."""
        return self.process.poll()

    def wait_healthy(self, url: str, timeout: float) -> tuple[bool, str]:
        """Poll `url` until it answers 200, the app exits or `timeout` passes.

        Returns:
            (healthy, what happened in one line).
        """
        return wait_healthy(url, timeout, interval=_POLL, exited=self.exit_code)

    def log_tail(self, lines: int = 40, max_bytes: int = 64 * 1024) -> list[str]:
        """The last `lines` lines of its log (all of it once the app has exited), masked."""
        if self.exit_code() is not None:
            self._relay.join(_STOP_GRACE)
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - max_bytes))
                return [self.masker.mask(line) for line in handle.read().decode(errors="replace").splitlines()[-lines:]]
        except OSError:
            return []

    def stop(self) -> None:
        """End its process group: TERM, then KILL after a grace period. Safe to call twice."""
        stop_group(self.process, _STOP_GRACE)
        self._relay.join(_STOP_GRACE)  # its last lines reach the log
        (self.log_path.parent / "app.pid").unlink(missing_ok=True)


def register(run_dir: str, app: AppProcess) -> None:
    """Keep `app` running for the rest of the pipeline run at `run_dir` (L4 finds it with `running`)."""
    with _lock:
        _running.setdefault(run_dir, []).append(app)


def running(run_dir: str) -> list[AppProcess]:
    """The apps started for the pipeline run at `run_dir` that are still up."""
    with _lock:
        return [app for app in _running.get(run_dir, []) if app.exit_code() is None]


def stop_all(run_dir: str) -> int:
    """Stop every app started for the run at `run_dir`.

    Returns:
        How many were stopped.
    """
    with _lock:
        apps = _running.pop(run_dir, [])
    for app in apps:
        app.stop()
    return len(apps)


def reap_orphans(project_dir: Path) -> list[int]:
    """Stop app process groups that earlier runs under `project_dir` left (their dispatcher was killed).

    A group is stopped only when the dispatcher that started it is gone and its leader still carries the
    run's marker in its environment, so a recycled pid or a live run's app is never signalled.

    Returns:
        The process group ids stopped.
    """
    stopped = []
    for pid_file in project_dir.glob("*/L3/app.pid"):
        try:
            pgid_text, marker, owner = pid_file.read_text(encoding="utf-8").split("\n")[:3]
            pgid = int(pgid_text)
            if pid_alive(int(owner)):
                continue
            ours = carries(pgid, MARKER, marker)
        except (OSError, ValueError):
            ours = False
        if ours:
            signal_group(pgid, signal.SIGTERM)
            time.sleep(0.5)
            signal_group(pgid, signal.SIGKILL)
            stopped.append(pgid)
        pid_file.unlink(missing_ok=True)
    return stopped
