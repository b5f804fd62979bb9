"""The `local` transport: the node runner on this machine (the embedded default node), through the node agent.

A local attempt goes the way of an SSH node's (dispatch/cluster/transports/agent.py): one `runner.pyz serve`
per transport, here a subprocess of the dispatcher, starts, re-attaches to, recovers, follows and kills the runs,
and answers with their `result.json`. What is local is the stream only (`LocalStream`): the agent's stdin is a
Unix socket, so that an attempt's request carries the machine slot's lock descriptor (SCM_RIGHTS) to its runner,
which holds it while it lives; it keeps its machine slot even if the dispatcher is killed, and a restarted
dispatcher re-attaches to it (same cache key) instead of starting the spec twice.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dispatch.cluster.shipping import local_runner
from dispatch.cluster.transports import LineSink, RunRequest, explained
from dispatch.cluster.transports.agent import KILL_WAIT, NodeAgent
from dispatch.core.errors import NodeError
from dispatch.core.paths import check_name, local_path, run_dir_parts
from dispatch.core.results import SpecResult, read_json
from dispatch.runner import protocol
from dispatch.runner.commands import kill_run, live_runs
from dispatch.runner.task import base_environment

logger = logging.getLogger(__name__)
_GRACE = 300.0  # seconds past the attempt's longest run before its wait for a result gives up
_CLOSE_WAIT = 5.0  # seconds the agent has to exit once its stdin is closed, then again after SIGKILL
_SLOTS = 1 << 20  # the agent's own slot count: the machine's slots are counted by the dispatcher's slot files
SERVE_ERR = ".serve.err"
"""The local agents' stderr, in the run root."""


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
    import time

    status = read_json(run_dir / protocol.STATUS_FILE)
    if not status or status.get("state") != "running" or not protocol.runner_alive(str(run_dir)):
        return None
    if time.time() - float(status.get("heartbeat_at") or 0) > stale_after:
        return None
    return {**status, "runner_pid": protocol.lock_holder(str(run_dir)) or status.get("runner_pid")}


class LocalStream:
    """`runner.pyz serve` as a subprocess of this machine: requests on a Unix socket (with descriptors), events
    on a pipe. `close` closes the socket (the agent ends; its runners go on) and waits for the agent's exit.

    Raises:
        NodeError: the agent could not be started.
    """

    def __init__(self, node: str, root: Path) -> None:
        self.node = node
        argv = [sys.executable, str(local_runner(root)), "serve", "--root", str(root), "--slots", str(_SLOTS)]
        ours, theirs = socket.socketpair()
        try:
            with open(root / SERVE_ERR, "ab") as err:  # the agent's runners get the allow-list, as their steps do:
                self.proc = subprocess.Popen(  # keys of ours in an environ would be readable in /proc by a step
                    argv, stdin=theirs, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                    env=base_environment(dict(os.environ)))
        except OSError as exc:
            ours.close()
            raise NodeError(node, f"cannot start the local node agent ({argv[1]}): {exc}") from exc
        finally:
            theirs.close()
        self._sock = ours
        self._send_lock = threading.Lock()
        self._closed = False

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write one request; `fds` go with its first byte. Raises NodeError when the agent is gone."""
        try:
            with self._send_lock:
                sent = socket.send_fds(self._sock, [data], list(fds)) if fds else 0
                self._sock.sendall(data[sent:])
        except OSError as exc:
            raise NodeError(self.node, f"the local node agent is gone: {exc}") from exc

    def lines(self) -> Iterator[bytes]:
        """The agent's events, line by line, to its end (read by the agent client's one reader thread)."""
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                yield line.rstrip(b"\n")
        finally:
            self.proc.stdout.close()

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()  # the agent reads the end of its stdin and exits
        try:
            self.proc.wait(timeout=_CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            logger.warning("node %s: the local agent (pid %s) did not exit; killing it", self.node, self.proc.pid)
            self.proc.kill()
            try:
                self.proc.wait(timeout=_CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                logger.warning("node %s: the local agent (pid %s) outlived SIGKILL", self.node, self.proc.pid)


class LocalTransport:
    """Run spec attempts on this machine; `close` ends its agent (the runners go on).

    Args:
        root: where run directories live (`<DISPATCH_HOME>/runs`).
        node: the node's name (`local`).
    """

    def __init__(self, root: Path, node: str = "local") -> None:
        self.root = Path(os.path.abspath(root))
        self.node = node
        self.agent = NodeAgent(node, self._stream)

    def _stream(self) -> LocalStream:
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalStream(self.node, self.root)

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
        """Run one attempt (or re-attach to the live runner of the same attempt) until it ends.

        Args:
            request: the attempt.
            on_line: receives each line of the spec's log.
            slot_fd: the machine-slot lock, inherited by the runner so it keeps the slot while it lives.
            secrets: environment for the agent (API keys), given to the runner in its request only.
        """
        run_dir = run_dir_for(self.root, request.project, request.task_id)
        extra = {"node": self.node, "run_dir": str(run_dir), "log_path": str(run_dir / protocol.LOG_FILE),
                 "cache_key": request.cache_key, "run_id": request.run_id, "attempt": request.attempt}
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            data = self.agent.run(str(run_dir), request.task_json(), secrets, on_line,
                                  timeout=request.longest(_GRACE), fd=slot_fd)
        except (NodeError, OSError, ValueError) as exc:
            err = run_dir / "runner.err"
            tail = err.read_text(errors="replace")[-2000:].strip() if err.is_file() else ""
            reason = f"the local node runner gave no result: {exc}" + (f"; runner.err: {tail}" if tail else "")
            logger.warning("%s %s: %s", self.node, request.task_id, reason)
            return request.failure(reason, status="lost", run_dir=extra["run_dir"], log_path=extra["log_path"])
        assert data is not None  # `start` is true: the agent starts what it cannot attach to or recover
        return explained(SpecResult.from_runner(data, project=request.project, task_id=request.task_id, **extra))

    def cancel(self, project: str, task_id: str) -> None:
        """Kill the attempt's runner and wait until it has gone (its `run` then returns `killed`)."""
        try:
            self.agent.kill(str(run_dir_for(self.root, project, task_id)))
        except NodeError as exc:
            logger.warning("node %s: could not kill %s: %s", self.node, task_id, exc)

    def adoptable_runs(self, project: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """Runs of `project` here a restarted dispatcher can adopt, as task id -> cache key: those whose
        runner is still alive, and those that ended in success while no dispatcher watched (`runner live`)."""
        found = live_runs(str(_tasks_dir(self.root, project)), finished=True)
        return ({task_id: key for task_id, key, state in found if state == "running"},
                {task_id: key for task_id, key, state in found if state == "succeeded"})

    def kill_project(self, project: str) -> int:
        """Kill every live runner of `project` on this machine (also orphans of a dead dispatcher), waiting for
        each to go (`runner kill`, all at once); returns how many were running."""
        live, _ = self.adoptable_runs(project)
        if not live:
            return 0
        tasks = _tasks_dir(self.root, project)
        pool = ThreadPoolExecutor(max_workers=min(16, len(live)), thread_name_prefix="kill")
        futures = [pool.submit(kill_run, str(tasks / task_id)) for task_id in live]
        pool.shutdown(wait=False)
        for future in futures:
            future.result(timeout=KILL_WAIT)
        return len(live)

    def close(self) -> None:
        """End this transport's agent (its runners go on) and wait for it."""
        self.agent.close()

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
