"""The `ssh` transport: run a spec on a remote node over one reused paramiko connection.

The node runner is shipped once per version (`runner.pyz`, its sha256 in its path). Each attempt is then one JSON line
to the node's agent (`runner.pyz serve`, one per node on one channel, dispatch/cluster/transports/agent.py, as
on the local node), which writes `task.json`, forks the runner detached (secrets in the request only, never on
disk), streams `task.log` back and answers with `result.json` when the runner exits. In scp mode the agent is
first asked for the attempt without starting it, and the project is copied into the run directory only when
nothing is there to re-attach to. The run survives a dropped connection; the next agent, or a restarted
dispatcher's, re-attaches to a runner still going with the same cache key instead of starting the spec twice.
A node that cannot be reached gives a `lost` result marked `node_fault`, so the spec retries on another node.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
from pathlib import Path, PurePosixPath

from dispatch.cluster.shipping import node_runner, ship
from dispatch.cluster.ssh import SSHPool
from dispatch.cluster.ssh_target import node_target
from dispatch.cluster.transports import LineSink, RunRequest, explained
from dispatch.cluster.transports.agent import NodeAgent
from dispatch.core.errors import DispatchError, NodeError, UnsafePath
from dispatch.core.nodes import Node
from dispatch.core.paths import check_name, local_path, remote_arg, remote_path, run_dir_parts
from dispatch.core.results import SpecResult
from dispatch.runner import protocol

logger = logging.getLogger(__name__)
_COMMAND_TIMEOUT = 60.0
_FOLLOW_GRACE = 300.0


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
        timeout = request.longest(_FOLLOW_GRACE)
        try:
            self.runner()
            data = None
            if sync_from is not None and sync_from.is_dir() and any(sync_from.iterdir()):
                # scp mode: the project is copied in only when there is nothing to re-attach to or recover
                data = self.agent.run(run_dir, request.task_json(), secrets, on_line, timeout=timeout, start=False)
                if data is None:
                    self.pool.put_dir(self.target, sync_from, request.workdir)
            if data is None:
                data = self.agent.run(run_dir, request.task_json(), secrets, on_line, timeout=timeout)
        except NodeError as exc:
            return self._lost(request, run_dir, f"node {self.node.name} failed: {exc}", node_fault=True)
        except (DispatchError, OSError, ValueError, KeyError) as exc:
            return self._lost(request, run_dir, f"on node {self.node.name}: {type(exc).__name__}: {exc}",
                              node_fault=True)
        assert data is not None
        return self._result(data, request, run_dir, sync_back)

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
        """Kill the attempt's runner through the node's agent and wait until it has gone."""
        try:
            self.agent.kill(self.run_dir(project, task_id))
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

