"""Bring a project's work back from the nodes, and clean up or stop it on every node.

- `collect_outputs`: each spec's `task.log` and `result.json` (from whichever node ran it) and the files
  it changed, into `DISPATCH_HOME/results/<project>/<task_id>/`; in git mode also `collect_branches`,
  which merges every spec's branch into `dispatch/<project>/integration` and reports conflicts per spec.
  `files_changed` comes from a node (hostile input): an entry is copied only when it stays inside both the
  code directory and the results directory, symlinks resolved (`dispatch.core.paths.local_path`).
- `kill_everywhere` / `cleanup_here` / `cleanup_everywhere`: the project's runners / its directories under
  DISPATCH_HOME / its run directories on every node, and nothing of any other project.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import httpx

from dispatch.cluster.config import ProjectConfig, load_nodes
from dispatch.cluster.gitcollect import CollectReport, collect_branches
from dispatch.cluster.transports.build import NodeTransports, local_transport
from dispatch.core.errors import DispatchError, UnsafePath
from dispatch.core.nodes import Node
from dispatch.core.paths import check_name, local_path
from dispatch.core.results import ProjectState, cached_results, read_json, state_path
from dispatch.core.settings import DispatchSettings

logger = logging.getLogger(__name__)


@dataclass
class CollectSummary:
    copied: list[str] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)
    merge: CollectReport | None = None


@contextmanager
def remote_transports(settings: DispatchSettings, nodes: list[Node] | None = None):
    """SSH transports for the configured ssh nodes, sharing one pool closed on exit; a node whose key is only
    in its `ClusterNode` block gets it from there, as in a run."""
    nodes = [n for n in (load_nodes(settings) if nodes is None else nodes) if n.transport == "ssh"]
    keys: dict[str, str] = {}
    if any(not n.key_path for n in nodes):
        from dispatch.prefect.embedded import prepare_prefect

        prepare_prefect(settings)  # before Prefect is imported (embedded: this home's local server)
        from dispatch.prefect.nodes_admin import ssh_key_secrets

        keys = ssh_key_secrets(nodes, logger)
    with NodeTransports(settings.runs_dir, bool(settings.prefect_api_url), keys) as built:
        yield {n.name: built.for_node(n) for n in nodes}


def collect_outputs(settings: DispatchSettings, state: ProjectState, config: ProjectConfig,
                    code_dir: Path) -> CollectSummary:
    """Copy every spec's outputs into `results/<project>/` and, in git mode, merge their branches."""
    summary = CollectSummary()
    target = settings.project_dir("results", state.project)
    with remote_transports(settings) as remote:
        for task_id, row in state.specs.items():
            if not row.log_path:
                continue
            try:
                dest = local_path(target, check_name(task_id, "task_id"))
                dest.mkdir(parents=True, exist_ok=True)
                if row.node in remote:
                    remote_dir = remote[row.node].run_dir(state.project, task_id)
                    for name in ("task.log", "result.json"):
                        remote[row.node].pool.get_file(remote[row.node].target, f"{remote_dir}/{name}", dest / name)
                else:
                    run_dir = Path(row.log_path).parent
                    if run_dir.parts[-3:] != (state.project, "tasks", task_id):
                        raise UnsafePath("log path", row.log_path, "is not in a run directory of this spec")
                    for name in ("task.log", "result.json"):
                        if (run_dir / name).exists():
                            shutil.copy2(run_dir / name, dest / name)
            except (DispatchError, OSError) as exc:
                summary.unreachable[task_id] = f"{row.node}: {exc}"
                continue
            result = read_json(dest / "result.json") or {}
            if config.sync_mode != "git":
                if refused := copy_changed_files(code_dir, dest / "files", result.get("files_changed")):
                    summary.refused[task_id] = refused
            summary.copied.append(task_id)
    if config.sync_mode == "git":
        done = [t for t, row in state.specs.items() if row.state == "succeeded"]
        summary.merge = collect_branches(repo_local=Path(config.repo_local) if config.repo_local else code_dir,
                                         project=state.project, task_ids=done, main_branch=config.main_branch,
                                         repo_url=config.repo_url)
    return summary


def copy_changed_files(code_dir: Path, files_dir: Path, files: object) -> list[str]:
    """Copy `files` (paths a node reported, relative to `code_dir`) into `files_dir`, keeping their layout.

    Returns:
        The entries refused: not a relative path, or leading (through `..` or a symbolic link) out of
        `code_dir` or `files_dir`. Entries that are no file in `code_dir` are skipped silently.
    """
    refused: list[str] = []
    for rel in files if isinstance(files, list) else []:
        try:
            parts = PurePosixPath(rel).parts if isinstance(rel, str) and not rel.startswith("/") else ()
            if not parts:
                raise UnsafePath("files_changed entry", rel, "is not a relative path")
            source = local_path(code_dir, *parts, what="files_changed entry")
            destination = local_path(files_dir, *parts, what="files_changed entry")
        except UnsafePath:
            refused.append(str(rel))
            continue
        if source.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    return refused


def kill_everywhere(settings: DispatchSettings, project: str) -> int:
    """Kill the project's runners here and on every ssh node, and cancel its spec-run flow runs on worker
    nodes (team mode); returns how many ran."""
    killed = local_transport(settings.runs_dir).kill_project(project)
    with remote_transports(settings) as remote:
        for name, transport in remote.items():
            try:
                killed += transport.kill_project(project)
            except DispatchError as exc:
                logger.warning("node %s: could not kill %s's runners: %s", name, project, exc)
    workers = [n for n in load_nodes(settings) if n.transport == "worker"] if settings.prefect_api_url else []
    if workers:
        with NodeTransports(settings.runs_dir, team_mode=True) as built:
            for node in workers:
                try:
                    killed += built.for_node(node).kill_project(project)
                except (DispatchError, httpx.HTTPError, OSError) as exc:
                    logger.warning("node %s: could not cancel %s's flow runs: %s", node.name, project, exc)
    return killed


def cleanup_here(settings: DispatchSettings, project: str, everything: bool = False) -> list[Path]:
    """Remove the project's run directories under DISPATCH_HOME (with `everything` also its results, state
    file and cached results); returns what was removed. Every path is proven inside the home first.

    Raises:
        UnsafePath: `project` is no valid name, or a path would lead out of the home.
    """
    targets = [settings.project_dir("runs", project)]
    if everything:
        targets += [settings.project_dir("results", project), state_path(settings.state_dir, project)]
        targets += [local_path(settings.cache_dir, p.name) for p in cached_results(settings.cache_dir, project)]
    removed = []
    for path in targets:
        if path.is_symlink() or path.is_file():  # a link goes, never what it points to
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed


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
