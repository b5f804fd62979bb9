"""Collect, on the dispatcher: merge a project's finished spec branches into `dispatch/<project>/integration`.

The merges happen in a temporary worktree of the user's clone, in dependency order, reporting conflicts
instead of stopping at them; the user's checkout is not touched. The branches are the ones the node scripts of
dispatch/cluster/gitsync.py pushed.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.cluster.gitsync import GIT_EMAIL, GIT_NAME, branch_name, check_ref_part, integration_branch
from dispatch.core.errors import DispatchError

logger = logging.getLogger(__name__)

_COLLECT_NAMESPACE = "refs/remotes/dispatch-collect"
_GIT_TIMEOUT = 120.0
_FETCH_TIMEOUT = 600.0
_URL_USERINFO = re.compile(r"(://)[^/@\s]+@")


@dataclass
class MergeOutcome:
    """What happened to one spec's branch during collect.

    Attributes:
        task_id: the spec.
        status: "merged", "conflict", "missing" (no branch) or "up_to_date" (nothing new in it).
        files: files the merge changed ("merged") or left in conflict ("conflict").
        message: a sentence for the user.
    """

    task_id: str
    status: str
    files: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class CollectReport:
    """The result of `collect_branches`.

    Attributes:
        integration_branch: the branch the merges went to, `dispatch/<project>/integration`.
        outcomes: one per task, in merge order.
        head: the integration branch's commit after the merges.
    """

    integration_branch: str
    outcomes: list[MergeOutcome]
    head: str = ""

    def conflicts(self) -> list[MergeOutcome]:
        """The outcomes whose merge conflicted (and was left out)."""
        return [outcome for outcome in self.outcomes if outcome.status == "conflict"]


def _redact(text: str) -> str:
    return _URL_USERINFO.sub(r"\1***@", text)


def _git(repo: Path, *args: str, timeout: float = _GIT_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    """Run git in `repo`; raise DispatchError (command, exit code, stderr tail) if it fails and `check`."""
    command = ["git", "-C", str(repo), *args]
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_MERGE_AUTOEDIT": "no", "LC_ALL": "C"}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise DispatchError("git is not installed (or not on PATH); git sync mode needs it") from exc
    except subprocess.TimeoutExpired as exc:
        raise DispatchError(f"git took over {timeout:.0f} s, stopped: {_redact(shlex.join(command))}") from exc
    if check and proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise DispatchError(f"git exited {proc.returncode}: {_redact(shlex.join(command))}"
                            f"\n--- stderr (tail) ---\n{_redact(tail)}")
    return proc


def _resolve(repo: Path, ref: str) -> str | None:
    proc = _git(repo, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _identity_options(repo: Path) -> list[str]:
    """`-c` options giving merges an identity where git has none configured (never written anywhere)."""
    options = []
    for key, value in (("user.name", GIT_NAME), ("user.email", GIT_EMAIL)):
        if _git(repo, "config", key, check=False).returncode != 0:
            options += ["-c", f"{key}={value}"]
    return options


def _split_z(output: str) -> list[str]:
    return [name for name in output.split("\0") if name]


def collect_branches(*, repo_local: Path, project: str, task_ids: list[str], main_branch: str,
                     repo_url: str | None = None) -> CollectReport:
    """Merge the specs' branches into `dispatch/<project>/integration`, reporting conflicts.

    The integration branch restarts from `main_branch` (the local branch, else `origin/<main_branch>`); each
    task's branch is merged with `--no-ff` in the given order, in a temporary worktree, so the user's current
    branch and working tree are not touched. A conflicting merge is aborted and recorded, and the next goes on.

    Args:
        repo_local: a clone of the project's repository on this machine.
        project: the project name.
        task_ids: the specs to merge, dependencies first.
        main_branch: the branch the integration starts from.
        repo_url: where the nodes pushed; fetched first (into `refs/remotes/dispatch-collect/<project>/`).
            Without it, local branches `dispatch/<project>/<task_id>` (else `origin/...`) are merged.

    Returns:
        The report: one outcome per task.

    Raises:
        ValueError: if a name cannot make a git branch.
        DispatchError: if repo_local is not a repository, the integration branch is checked out, or git fails.
    """
    check_ref_part(main_branch, "main_branch", allow_slash=True)
    branches = {task_id: branch_name(project, task_id) for task_id in task_ids}
    integration = integration_branch(project)
    repo_local = Path(repo_local).expanduser()
    if not repo_local.is_dir() or _git(repo_local, "rev-parse", "--git-dir", check=False).returncode != 0:
        raise DispatchError(f"repo_local {repo_local} is not a git repository; set repo_local in projects.json "
                            f"to a clone of the project's repository")
    if repo_url:
        namespace = f"{_COLLECT_NAMESPACE}/{project}"
        _git(repo_local, "fetch", "--quiet", "--prune", "--no-tags", repo_url,
             f"+refs/heads/dispatch/{project}/*:{namespace}/*", timeout=_FETCH_TIMEOUT)
        candidates = [f"{namespace}/{{}}"]
    else:
        candidates = [f"refs/heads/dispatch/{project}/{{}}", f"refs/remotes/origin/dispatch/{project}/{{}}"]
    base = _resolve(repo_local, f"refs/heads/{main_branch}") or _resolve(
        repo_local, f"refs/remotes/origin/{main_branch}")
    if base is None:
        raise DispatchError(f"{repo_local} has no branch {main_branch!r} (nor origin/{main_branch}); "
                            f"set main_branch in projects.json, or fetch it")
    worktrees = _git(repo_local, "worktree", "list", "--porcelain").stdout.splitlines()
    if f"branch refs/heads/{integration}" in worktrees:
        raise DispatchError(f"{integration} is checked out in {repo_local} (or one of its worktrees); switch to "
                            f"another branch so collect can rebuild it")
    identity = _identity_options(repo_local)
    outcomes: list[MergeOutcome] = []
    scratch = Path(tempfile.mkdtemp(prefix="dispatch-collect-"))
    work = scratch / "integration"
    try:
        _git(repo_local, "worktree", "add", "--quiet", "--detach", str(work), base)
        for task_id, branch in branches.items():
            outcomes.append(_merge_one(work, task_id, branch, integration, candidates, identity))
        head = _git(work, "rev-parse", "HEAD").stdout.strip()
        _git(repo_local, "branch", "--force", integration, head)
    finally:
        _git(repo_local, "worktree", "remove", "--force", str(work), check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        _git(repo_local, "worktree", "prune", check=False)
    merged = sum(outcome.status == "merged" for outcome in outcomes)
    logger.info("collect %s: %d merged, %d conflicts, %d missing into %s at %s", project, merged,
                sum(o.status == "conflict" for o in outcomes), sum(o.status == "missing" for o in outcomes),
                integration, head[:12])
    return CollectReport(integration_branch=integration, outcomes=outcomes, head=head)


def _merge_one(work: Path, task_id: str, branch: str, integration: str, candidates: list[str],
               identity: list[str]) -> MergeOutcome:
    """Merge one spec's branch into the detached integration worktree."""
    ref = next((c.format(task_id) for c in candidates if _resolve(work, c.format(task_id))), None)
    if ref is None:
        return MergeOutcome(task_id, "missing", [], f"no branch {branch}: the spec never finished in git mode")
    if _git(work, "merge-base", "--is-ancestor", ref, "HEAD", check=False).returncode == 0:
        return MergeOutcome(task_id, "up_to_date", [], f"{branch} has nothing the integration lacks")
    before = _git(work, "rev-parse", "HEAD").stdout.strip()
    merge = _git(work, *identity, "merge", "--no-ff", "--no-edit", "-m", f"Merge {branch}", ref, check=False)
    if merge.returncode == 0:
        files = _split_z(_git(work, "diff", "--name-only", "-z", before, "HEAD").stdout)
        return MergeOutcome(task_id, "merged", files, f"merged {branch} ({len(files)} files)")
    files = _split_z(_git(work, "diff", "--name-only", "--diff-filter=U", "-z").stdout)
    _git(work, "merge", "--abort", check=False)
    if not files:
        tail = "\n".join((merge.stderr + merge.stdout).strip().splitlines()[-15:])
        raise DispatchError(f"git merge of {branch} failed without a conflict (exit {merge.returncode})"
                            f"\n--- output (tail) ---\n{tail}")
    return MergeOutcome(task_id, "conflict", files,
                        f"{branch} conflicts with the branches merged before it in {', '.join(files)}; left out "
                        f"of {integration}: merge it by hand, or re-run the spec after the others")
