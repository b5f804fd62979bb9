"""The `local` transport: the node runner as a subprocess of this machine (the embedded default node).

The runner starts in its own session with the slot's lock descriptor inherited, so it keeps its
machine slot while it lives even if the dispatcher is killed; a restarted dispatcher re-attaches to
it (same cache key) instead of starting the spec twice.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dispatch.cluster.transports import LineSink, RunRequest, explained, failure
from dispatch.core.paths import check_name, local_path, run_dir_parts
from dispatch.core.results import SpecResult, pid_alive, read_json, write_json
from dispatch.runner import protocol
from dispatch.runner.shipping import local_runner
from dispatch.runner.task import base_environment

logger = logging.getLogger(__name__)
_POLL = 0.25  # seconds between two reads of a running spec's log (its end is noticed at once)


class _ExitWaiter:
    """Wait for a process to exit without polling: a pidfd (Linux 5.3+), else short sleeps.

    Calling it with a timeout returns True once the process has exited (a child is reaped too).
    """

    def __init__(self, pid: int, proc: subprocess.Popen | None) -> None:
        self.pid, self.proc = pid, proc
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here, or the process is gone already
            self.fd = None

    def _gone(self) -> bool:
        return self.proc.poll() is not None if self.proc is not None else not pid_alive(self.pid)

    def __call__(self, timeout: float) -> bool:
        if self.fd is not None:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            return bool(ready) and (self.proc is None or self.proc.wait() is not None)
        if self._gone():
            return True
        if timeout:
            time.sleep(min(timeout, 0.05))
        return self._gone()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_dir_for(root: Path, project: str, task_id: str) -> Path:
    """`<root>/<project>/tasks/<task_id>`: one spec's run directory on a node, proven inside `root`.

    Raises:
        UnsafePath: the project or task id is no valid name, or the path leads out of `root`.
    """
    return local_path(root, *run_dir_parts(project, task_id), what="run directory")


def _tasks_dir(root: Path, project: str) -> Path:
    return local_path(root, check_name(project, "project name"), "tasks", what="run directory")


def live_runner(run_dir: Path, stale_after: float = 30.0) -> dict | None:
    """The runner's status when a runner holds this directory's lock (`protocol.runner_alive`), has started (its
    status.json says running) and beat its heart within `stale_after` seconds, else None. Its `runner_pid` is
    the lock's holder."""
    status = read_json(run_dir / protocol.STATUS_FILE)
    if not status or status.get("state") != "running" or not protocol.runner_alive(str(run_dir)):
        return None
    if time.time() - float(status.get("heartbeat_at") or 0) > stale_after:
        return None
    return {**status, "runner_pid": protocol.lock_holder(str(run_dir)) or status.get("runner_pid")}


class LocalTransport:
    """Run spec attempts on this machine.

    Args:
        root: where run directories live (`<DISPATCH_HOME>/runs`).
        node: the node's name (`local`).
    """

    def __init__(self, root: Path, node: str = "local") -> None:
        self.root = root
        self.node = node
        self._procs: dict[tuple[str, str], subprocess.Popen] = {}
        self._cancelled: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @property
    def root_path(self) -> str:
        return str(self.root)

    def exec(self, script: str, timeout: float) -> tuple[int, str, str]:
        """Run a POSIX sh script here: (exit code, stdout, stderr)."""
        try:
            done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            return -1, "", f"timed out after {timeout:.0f}s: {exc}"
        return done.returncode, done.stdout, done.stderr

    def workdir(self, project: str, task_id: str) -> str | None:
        """None: local specs work in the project's code directory itself."""
        return None

    def run(self, request: RunRequest, on_line: LineSink, slot_fd: int | None = None,
            secrets: dict[str, str] | None = None, **_: object) -> SpecResult:
        """Run one attempt (or follow the live runner of the same attempt) until it ends.

        Args:
            request: the attempt.
            on_line: receives each line of the spec's log.
            slot_fd: the machine-slot lock, inherited by the runner so it keeps the slot while it lives.
            secrets: environment for the agent (API keys), given to the runner on its stdin only.
        """
        run_dir = run_dir_for(self.root, request.project, request.task_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        key = (request.project, request.task_id)
        status = live_runner(run_dir)
        previous = read_json(run_dir / protocol.TASK_FILE) or {}
        proc: subprocess.Popen | None = None
        finished = read_json(run_dir / protocol.RESULT_FILE) if not status else None
        if status and previous.get("cache_key") == request.cache_key:
            on_line(f"re-attached to the running attempt (runner pid {status.get('runner_pid')})")
            pid = int(status["runner_pid"])
        elif (finished and finished.get("status") == "succeeded" and previous.get("cache_key") == request.cache_key
              and not request.fresh):
            on_line("recovered the result of this attempt, which finished while no dispatcher watched")
            return self._result(run_dir, request, None)
        else:
            if status:  # a runner of an edited spec: it must not keep editing files, and it must be gone (with
                self._kill_runner(run_dir)  # its lock) before its files are rotated and a new runner starts
            self._rotate(run_dir)
            write_json(run_dir / protocol.TASK_FILE, request.task_json())
            argv = [sys.executable, str(local_runner(self.root)), "run", str(run_dir)]
            argv += ["--secrets-stdin"] if secrets else []
            with open(run_dir / "runner.err", "wb") as err:  # the runner gets the allow-list, as its steps do:
                proc = subprocess.Popen(  # keys of ours in its environ would be readable in /proc by a step
                    argv, stdin=subprocess.PIPE if secrets else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=err, start_new_session=True, pass_fds=(slot_fd,) if slot_fd is not None else (),
                    env=base_environment(dict(os.environ)),
                )
            if secrets:
                proc.stdin.write(json.dumps(secrets).encode())
                proc.stdin.close()
            pid = proc.pid
        with self._lock:
            if proc is not None:
                self._procs[key] = proc
            if key in self._cancelled:
                self._kill_pid(pid)
        try:
            self._follow(run_dir, pid, proc, on_line)
        finally:
            with self._lock:
                self._procs.pop(key, None)
        return self._result(run_dir, request, proc)

    def _follow(self, run_dir: Path, pid: int, proc: subprocess.Popen | None, on_line: LineSink) -> None:
        log = run_dir / protocol.LOG_FILE
        offset, pending = 0, b""
        exited = _ExitWaiter(pid, proc)
        try:
            while True:
                running = not exited(0)
                if log.exists():
                    with open(log, "rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read()
                    offset += len(chunk)
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        on_line(line.decode("utf-8", "replace"))
                if not running:
                    break
                exited(_POLL)  # returns at once when the runner exits, else after one log poll
        finally:
            exited.close()
        if pending:
            on_line(pending.decode("utf-8", "replace"))

    def _result(self, run_dir: Path, request: RunRequest, proc: subprocess.Popen | None) -> SpecResult:
        data = read_json(run_dir / protocol.RESULT_FILE)
        extra = {"node": self.node, "run_dir": str(run_dir), "log_path": str(run_dir / protocol.LOG_FILE),
                 "cache_key": request.cache_key, "run_id": request.run_id, "attempt": request.attempt}
        if not data:
            err_file = run_dir / "runner.err"
            err = err_file.read_text(errors="replace")[-2000:] if err_file.exists() else ""
            code = proc.returncode if proc is not None else None
            return failure(request.project, request.task_id,
                           f"the node runner exited ({code}) without a result.json: {err.strip()}", status="lost",
                           exit_code=code, **extra)
        return explained(SpecResult.from_runner(data, project=request.project, task_id=request.task_id, **extra))

    @staticmethod
    def _rotate(run_dir: Path) -> None:
        """Keep an earlier attempt's log as `task.log.<n>`; drop its status and result."""
        log = run_dir / protocol.LOG_FILE
        if log.exists():
            n = 1
            while (run_dir / f"task.log.{n}").exists():
                n += 1
            log.rename(run_dir / f"task.log.{n}")
        for name in (protocol.STATUS_FILE, protocol.RESULT_FILE):
            (run_dir / name).unlink(missing_ok=True)

    @staticmethod
    def _kill_runner(run_dir: Path) -> None:
        """Stop the runner of `run_dir` and wait until it has gone (the runner's `kill`: SIGTERM, its grace, then
        SIGKILL, and its step's process group), as an SSH node does."""
        try:
            runner = local_runner(run_dir.parents[2])  # <root>/<project>/tasks/<task_id>
            done = subprocess.run([sys.executable, str(runner), "kill", str(run_dir)], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL,
                                  env=base_environment(dict(os.environ)))
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"the runner of {run_dir} did not stop within 60 s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"could not stop the runner of {run_dir}: {done.stderr.strip()[-500:]}")

    @staticmethod
    def _kill_pid(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def cancel(self, project: str, task_id: str) -> None:
        key = (project, task_id)
        with self._lock:
            self._cancelled.add(key)
            proc = self._procs.get(key)
        if proc is not None:
            self._kill_pid(proc.pid)
        else:
            status = live_runner(run_dir_for(self.root, project, task_id))
            if status:
                self._kill_pid(int(status["runner_pid"]))

    def adoptable_runs(self, project: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """Runs of `project` here a restarted dispatcher can adopt, as task id -> cache key: those whose
        runner is still alive, and those that ended in success while no dispatcher watched."""
        live: dict[str, str | None] = {}
        finished: dict[str, str | None] = {}
        for run_dir in sorted(_tasks_dir(self.root, project).glob("*")):
            key = (read_json(run_dir / protocol.TASK_FILE) or {}).get("cache_key")
            if live_runner(run_dir, stale_after=float("inf")):
                live[run_dir.name] = key
            elif (read_json(run_dir / protocol.RESULT_FILE) or {}).get("status") == "succeeded":
                finished[run_dir.name] = key
        return live, finished

    def kill_project(self, project: str) -> int:
        """Kill every live runner of `project` on this machine (also orphans of a dead dispatcher)."""
        killed = 0
        for run_dir in sorted(_tasks_dir(self.root, project).glob("*")):
            status = live_runner(run_dir, stale_after=float("inf"))
            if status:
                self._kill_pid(int(status["runner_pid"]))
                killed += 1
        return killed


