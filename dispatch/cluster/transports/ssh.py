"""The `ssh` transport: run a spec on a remote node over one reused paramiko connection.

The node runner is shipped once per version (`runner.pyz`, its sha256 in its path). Each attempt is then one JSON line
to the node's agent (`runner.pyz serve`, one per node on one channel, dispatch/cluster/transports/agent.py),
which writes `task.json`, forks the runner detached (secrets in the request only, never on disk),
streams `task.log` back and answers with `result.json` when the runner exits. The long way, one
command per step, remains for what the agent leaves to it: scp mode (copy the project into the run
directory first), an earlier runner holding the directory, and a lost agent (re-attach and follow).
The run survives a dropped connection; a restarted dispatcher re-attaches to a runner still going
with the same cache key instead of starting the spec twice. A node that cannot be reached gives a
`lost` result marked `node_fault`, so the spec retries on another node.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import threading
from pathlib import Path, PurePosixPath

from dispatch.cluster.config import Node
from dispatch.cluster.ssh import SSHPool
from dispatch.cluster.ssh_target import node_target
from dispatch.cluster.transports import LineSink, RunRequest, explained
from dispatch.cluster.transports.agent import AgentLost, NodeAgent
from dispatch.core.errors import DispatchError, NodeError, UnsafePath
from dispatch.core.paths import check_name, local_path, remote_arg, remote_path, run_dir_parts
from dispatch.core.results import SpecResult
from dispatch.runner import protocol
from dispatch.runner.shipping import node_runner, ship

logger = logging.getLogger(__name__)
_COMMAND_TIMEOUT = 60.0
_FOLLOW_GRACE = 300.0
_INLINE_TASK_BYTES = 64 * 1024  # a larger task.json (long prompts) goes over SFTP instead of the command line


class SSHTransport:
    """Run spec attempts on one remote node.

    Args:
        node: the node (its `ssh_host` or `host`, `remote_root`, `python`, ...).
        pool: the dispatcher's shared SSH connection pool.
        key_secret: private key text from a `ClusterNode` block, when the key is not a file.
    """

    def __init__(self, node: Node, pool: SSHPool, key_secret: str | None = None) -> None:
        self.node = node
        self.pool = pool
        self.target = node_target(node, key_secret=key_secret)
        self.root = node.remote_root.removeprefix("~/").rstrip("/") or "."
        self._runner: str | None = None
        self._ship_lock = threading.Lock()
        self.agent = NodeAgent(node.name, lambda: self.pool.open_stream(
            self.target, f"exec {self.runner()} serve --root {shlex.quote(self.root)} --slots {node.slots}"))

    # -- paths (all built by dispatch.core.paths: checked components, quoted for the shell) ----------
    def run_dir(self, project: str, task_id: str) -> str:
        """`<root>/<project>/tasks/<task_id>` on the node (raises UnsafePath for a bad name)."""
        return remote_path(self.root, *run_dir_parts(project, task_id))

    def workdir(self, project: str, task_id: str) -> str:
        """Where a spec works on this node in scp mode: a copy of the project in its run directory."""
        return remote_path(self.root, *run_dir_parts(project, task_id), "work")

    @property
    def root_path(self) -> str:
        return self.root

    def probe(self) -> None:
        """Raise NodeError unless the node answers over SSH."""
        self.pool.connect(self.target)

    def exec(self, script: str, timeout: float) -> tuple[int, str, str]:
        """Run a POSIX sh script on the node: (exit code, stdout, stderr); unreachable raises NodeError."""
        result = self.pool.run(self.target, script, timeout=timeout, check=False)
        return result.exit_code, result.stdout, result.stderr

    def _command(self, command: str, timeout: float = _COMMAND_TIMEOUT, **kwargs) -> str:
        return self.pool.run(self.target, command, timeout=timeout, **kwargs).stdout

    def runner(self) -> str:
        """The command that starts the node runner, shipping it first if this node lacks this version."""
        with self._ship_lock:
            if self._runner is None:
                runner = node_runner(self.root, self.node.python)
                present = self.pool.run(self.target, f"test -f {runner.path_arg}", timeout=_COMMAND_TIMEOUT,
                                        check=False).exit_code == 0
                if not present:
                    logger.info("node %s: shipping the node runner to %s", self.node.name, runner.directory)
                    ship(self.pool, self.target, runner)
                self._runner = runner.command
            return self._runner

    # -- one attempt ---------------------------------------------------------------------------
    def run(self, request: RunRequest, on_line: LineSink, slot_fd: int | None = None, *,
            secrets: dict[str, str] | None = None, sync_from: Path | None = None,
            sync_back: Path | None = None) -> SpecResult:
        """Run (or re-attach to) one attempt on the node and return its result.

        Args:
            request: the attempt; `workdir` is a path on the node.
            on_line: receives each line of the spec's log as it is written.
            slot_fd: unused here (the local node's machine slot).
            secrets: environment for the agent (API keys), sent on the runner's stdin only.
            sync_from: scp mode: copy this local directory into the workdir first.
            sync_back: scp mode: copy the files the spec changed back into this local directory.
        """
        run_dir = self.run_dir(request.project, request.task_id)
        quoted = shlex.quote(run_dir)
        marker = f"@@dispatch-result-{request.run_id}@@"
        try:
            runner = self.runner()
            needs_sync = sync_from is not None and sync_from.is_dir() and any(sync_from.iterdir())
            if not needs_sync:  # the usual case: one line to the node's agent, which starts and watches it
                try:
                    data = self.agent.run(run_dir, request.task_json(), secrets, on_line,
                                          timeout=request.longest(_FOLLOW_GRACE))
                except AgentLost as exc:  # the runner carries on without the agent: re-attach the long way
                    logger.info("%s %s: %s; re-attaching", self.node.name, request.task_id, exc)
                    data = None
                if data is not None:
                    return self._result(data, request, run_dir, sync_back)
            # The long way: an earlier runner holds the directory, scp mode must copy the project first
            # (only when starting), or the agent was lost while the attempt ran.
            found = self._attach(runner, run_dir, request)
            if isinstance(found, dict):
                on_line("recovered the result of this attempt, which finished while no dispatcher watched")
                return self._result(found, request, run_dir, sync_back)
            pid = found
            if pid is None:
                if needs_sync:
                    self.pool.put_dir(self.target, sync_from, request.workdir)
                task = json.dumps(request.task_json()).encode()
                start = f"{runner} run {quoted} --detach --secrets-stdin"
                if len(task) <= _INLINE_TASK_BYTES:  # one round trip: write task.json and start the runner
                    start = f"{_write_task(quoted, task)} && {start}"
                else:
                    self.pool.put_file(self.target, task, f"{run_dir}/{protocol.TASK_FILE}", mode=0o600)
                out = self._command(start, stdin_data=json.dumps(secrets or {}))
                pid = int(json.loads(out.strip().splitlines()[-1])["pid"])
            else:
                on_line(f"re-attached to the running attempt (runner pid {pid})")
            # Follow the log until the runner exits, then print result.json after a marker line, so one
            # command streams the whole attempt and brings its result.
            data = self._follow(f"{runner} follow {quoted}", run_dir, request, marker, on_line)
        except NodeError as exc:
            return self._lost(request, run_dir, f"node {self.node.name} failed: {exc}", node_fault=True)
        except (DispatchError, OSError, ValueError, KeyError) as exc:
            return self._lost(request, run_dir, f"on node {self.node.name}: {type(exc).__name__}: {exc}",
                              node_fault=True)
        return self._result(data, request, run_dir, sync_back)

    def _follow(self, command: str, run_dir: str, request: RunRequest, marker: str, on_line: LineSink) -> dict:
        """Run `command` (it streams the spec's log), then print result.json after `marker`; return that JSON."""
        result_lines: list[str] = []

        def route(stream: str, line: str) -> None:
            if stream != "stdout":
                return
            if result_lines or line == marker:
                result_lines.append(line)
            else:
                on_line(line)

        self.pool.run(self.target, f"{command}; echo; echo {marker}; cat {shlex.quote(run_dir)}/{protocol.RESULT_FILE}",
                      timeout=request.longest(_FOLLOW_GRACE), check=False, on_line=route)
        data = json.loads("\n".join(result_lines[1:]) or "null")
        if not isinstance(data, dict):
            raise ValueError(f"no result.json in {run_dir} after the runner ended")
        return data

    def _result(self, data: dict, request: RunRequest, run_dir: str, sync_back: Path | None) -> SpecResult:
        result = SpecResult.from_runner(
            data, project=request.project, task_id=request.task_id, node=self.node.name, run_dir=run_dir,
            log_path=f"{self.node.name}:{run_dir}/{protocol.LOG_FILE}", cache_key=request.cache_key,
            run_id=request.run_id, attempt=request.attempt)
        if result.succeeded and sync_back is not None:
            try:
                self._copy_back(request.workdir, result.files_changed, sync_back)
            except (NodeError, OSError) as exc:
                return self._lost(request, run_dir, f"could not copy the results back: {exc}", node_fault=True)
        return explained(result)

    def _attach(self, runner: str, run_dir: str, request: RunRequest) -> int | dict | None:
        """What is on the node already for this very attempt (same cache key):

        the pid of its live runner (re-attach), its result when it finished while no dispatcher watched
        (recover it, do not run it again), or None (start it). A stale runner of an edited spec is killed.
        """
        quoted = shlex.quote(run_dir)
        status = json.loads(self._command(f"[ -e {quoted}/{protocol.STATUS_FILE} ] && {runner} status {quoted} || "
                                          "echo '{}'")
                            or "{}")
        if not status:
            return None
        previous = self.pool.run(self.target, f"cat {quoted}/{protocol.TASK_FILE}", timeout=_COMMAND_TIMEOUT,
                                 check=False).stdout
        try:  # the same attempt only when its task.json names exactly this cache key (not one containing it)
            task = json.loads(previous or "{}")
        except ValueError:
            task = {}
        same = isinstance(task, dict) and task.get("cache_key") == request.cache_key
        if status.get("alive") or status.get("pid_alive"):  # a late heartbeat under load is still alive
            if same:
                return int(status["runner_pid"])
            self._command(f"{runner} kill {quoted}")  # an edited spec's runner must stop
            return None
        result = status.get("result")
        if same and not request.fresh and isinstance(result, dict) and result.get("status") == "succeeded":
            return result
        return None

    def adoptable_runs(self, project: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """Runs of `project` on this node a restarted dispatcher can adopt, as task id -> cache key: those
        whose runner is still alive, and those that ended in success while no dispatcher watched."""
        tasks = remote_arg(self.root, check_name(project, "project name"), "tasks")
        out = self._command(f"{self.runner()} live --finished {tasks}")
        found = json.loads(out.strip().splitlines()[-1] or "[]")
        return ({task_id: key for task_id, key, state in found if state == "running"},
                {task_id: key for task_id, key, state in found if state == "succeeded"})

    def _copy_back(self, workdir: str, files: list[str], target: Path) -> None:
        """Copy the files the spec changed from its workdir into `target`; entries that are no relative path
        inside both (a node's report is hostile input: `..`, absolute, through a symlink) are left out."""
        for rel in files:
            try:
                parts = PurePosixPath(rel).parts if not rel.startswith("/") else ()
                if not parts:
                    raise UnsafePath("files_changed entry", rel, "is not a relative path")
                source = remote_path(workdir, *parts)
                destination = local_path(target, *parts, what="files_changed entry")
            except UnsafePath as exc:
                logger.warning("node %s: not copied back: %s", self.node.name, exc)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            # whole or not at all: another spec's project copy (put_dir) may read this directory meanwhile
            partial = destination.with_name(f".{destination.name}.{os.getpid()}.{threading.get_ident()}.part")
            try:
                self.pool.get_file(self.target, source, partial)
                os.replace(partial, destination)
            finally:
                partial.unlink(missing_ok=True)

    def _lost(self, request: RunRequest, run_dir: str, reason: str, node_fault: bool) -> SpecResult:
        logger.warning("%s %s: %s", self.node.name, request.task_id, reason)
        return request.failure(reason, status="lost", node_fault=node_fault, node=self.node.name, run_dir=run_dir)

    # -- control -------------------------------------------------------------------------------
    def cancel(self, project: str, task_id: str) -> None:
        try:
            self._command(f"{self.runner()} kill {shlex.quote(self.run_dir(project, task_id))}")
        except DispatchError as exc:
            logger.warning("node %s: could not kill %s: %s", self.node.name, task_id, exc)

    def kill_project(self, project: str) -> int:
        """Kill every runner of `project` on this node; returns how many were running."""
        tasks = remote_arg(self.root, check_name(project, "project name"), "tasks")
        out = self._command(
            f'n=0; for d in {tasks}/*/; do [ -d "$d" ] || continue; '
            f'{self.runner()} kill "$d" | grep -q \'"was_running": true\' && n=$((n+1)); done; echo $n',
            timeout=120)
        return int(out.strip().splitlines()[-1] or 0)

    def close(self) -> None:
        """Stop watching through the node's agent (its runners go on)."""
        self.agent.close()

    def cleanup(self, project: str) -> None:
        """Remove this project's run directories on the node (and nothing else).

        Raises:
            UnsafePath: `project` is no valid name (nothing is run on the node).
            DispatchError: runners of the project still live on the node (stop it first), or it failed.
        """
        directory = remote_arg(self.root, check_name(project, "project name"))
        live, _ = self.adoptable_runs(project)
        if live:
            raise DispatchError(f"{len(live)} runner(s) of {project} still live there ({', '.join(sorted(live)[:10])});"
                                f" stop them with `dispatch stop {project}`")
        self._command(f"rm -rf {directory}", timeout=300)


def _write_task(quoted_run_dir: str, task: bytes) -> str:
    """A shell command writing `task` as the run directory's task.json (0600), inline in the command line."""
    return (f"mkdir -p {quoted_run_dir} && (umask 077; printf %s {base64.b64encode(task).decode()} | "
            f"base64 -d > {quoted_run_dir}/{protocol.TASK_FILE})")
