"""Bring a project's work back from the nodes, and clean up or stop it on every node.

- `collect_outputs`: each spec's `task.log` and `result.json` (from whichever node ran it) and the files
  it changed, into `DISPATCH_HOME/results/<project>/<task_id>/`; in git mode also `collect_branches`,
  which merges every spec's branch into `dispatch/<project>/integration` and reports conflicts per spec.
- `kill_everywhere` / `cleanup_everywhere`: the project's runners / run directories on every node,
  and nothing of any other project.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dispatch.cluster import Node, ProjectConfig, load_nodes
from dispatch.errors import DispatchError
from dispatch.gitsync import CollectReport, collect_branches
from dispatch.results import ProjectState, read_json
from dispatch.settings import DispatchSettings
from dispatch.ssh import SSHPool
from dispatch.transports.local import LocalTransport
from dispatch.transports.ssh import SSHTransport

logger = logging.getLogger(__name__)


@dataclass
class CollectSummary:
    copied: list[str] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    merge: CollectReport | None = None


@contextmanager
def remote_transports(settings: DispatchSettings, nodes: list[Node] | None = None):
    """SSH transports for the configured ssh nodes, sharing one pool closed on exit; a node whose key is only
    in its `ClusterNode` block gets it from there, as in a run."""
    nodes = [n for n in (load_nodes(settings) if nodes is None else nodes) if n.transport == "ssh"]
    keys: dict[str, str] = {}
    if any(not n.key_path for n in nodes):
        os.environ.update(settings.prefect_environment())  # before Prefect is imported (embedded: under home)
        from dispatch.nodes_admin import ssh_key_secrets

        keys = ssh_key_secrets(nodes, logger)
    with SSHPool() as pool:
        yield {n.name: SSHTransport(n, pool, keys.get(n.name)) for n in nodes}


def _remote_path(log_path: str, node: str) -> str | None:
    prefix = f"{node}:"
    return log_path[len(prefix):].rsplit("/", 1)[0] if log_path.startswith(prefix) else None


def collect_outputs(settings: DispatchSettings, state: ProjectState, config: ProjectConfig,
                    code_dir: Path) -> CollectSummary:
    """Copy every spec's outputs into `results/<project>/` and, in git mode, merge their branches."""
    summary = CollectSummary()
    target = settings.results_dir / state.project
    with remote_transports(settings) as remote:
        for task_id, row in state.specs.items():
            if not row.log_path:
                continue
            dest = target / task_id
            dest.mkdir(parents=True, exist_ok=True)
            remote_dir = _remote_path(row.log_path, row.node) if row.node in remote else None
            try:
                if remote_dir is not None:
                    for name in ("task.log", "result.json"):
                        remote[row.node].pool.get_file(remote[row.node].target, f"{remote_dir}/{name}", dest / name)
                else:
                    run_dir = Path(row.log_path).parent
                    for name in ("task.log", "result.json"):
                        if (run_dir / name).exists():
                            shutil.copy2(run_dir / name, dest / name)
            except (DispatchError, OSError) as exc:
                summary.unreachable[task_id] = f"{row.node}: {exc}"
                continue
            result = read_json(dest / "result.json") or {}
            if config.sync_mode != "git":
                for rel in result.get("files_changed", []):
                    source = code_dir / rel
                    if source.is_file() and ".." not in Path(rel).parts:
                        (dest / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(source, dest / "files" / rel)
            summary.copied.append(task_id)
    if config.sync_mode == "git":
        done = [t for t, row in state.specs.items() if row.state == "succeeded"]
        summary.merge = collect_branches(repo_local=Path(config.repo_local) if config.repo_local else code_dir,
                                         project=state.project, task_ids=done, main_branch=config.main_branch,
                                         repo_url=config.repo_url)
    return summary


def kill_everywhere(settings: DispatchSettings, project: str) -> int:
    """Kill the project's runners here and on every ssh node, and cancel its spec-run flow runs on worker
    nodes (team mode); returns how many ran."""
    killed = LocalTransport(settings.runs_dir).kill_project(project)
    with remote_transports(settings) as remote:
        for name, transport in remote.items():
            try:
                killed += transport.kill_project(project)
            except DispatchError as exc:
                logger.warning("node %s: could not kill %s's runners: %s", name, project, exc)
    workers = [n for n in load_nodes(settings) if n.transport == "worker"] if settings.prefect_api_url else []
    if workers:
        from dispatch.transports.worker import FlowRunWatcher, WorkerTransport

        watcher = FlowRunWatcher()
        try:
            for node in workers:
                try:
                    killed += WorkerTransport(node, watcher).kill_project(project)
                except (DispatchError, httpx.HTTPError, OSError) as exc:
                    logger.warning("node %s: could not cancel %s's flow runs: %s", node.name, project, exc)
        finally:
            watcher.close()
    return killed


def cleanup_everywhere(settings: DispatchSettings, project: str) -> dict[str, str]:
    """Remove the project's run directories on every ssh node; returns the nodes that failed, with why."""
    failed: dict[str, str] = {}
    with remote_transports(settings) as remote:
        for name, transport in remote.items():
            try:
                transport.cleanup(project)
            except DispatchError as exc:
                failed[name] = str(exc)
    return failed
