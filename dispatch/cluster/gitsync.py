"""Git mode: each spec works on its own branch `dispatch/<project>/<task_id>`, in its own worktree.

On a node (any machine with git and a POSIX sh), the dispatcher runs two scripts built here:

- `prepare_script` keeps one clone per project at `<root>/<project>/repo`, fetches, and makes the spec's
  worktree `<root>/<project>/worktrees/<task_id>` on its branch, started from `origin/<main_branch>` with the
  branches of the spec's dependencies merged in. A conflict between them fails it with exit code
  `CONFLICT_EXIT_CODE`, naming the branch and the files.
- `finish_script` commits what the agent changed and force-pushes the branch, so dependents find it.

Specs of one project on one node share the clone, so both scripts hold `<root>/<project>/repo.lock`
(`flock` where util-linux has it, else a `mkdir` lock with retry) while they touch it.

On the dispatcher, `collect_branches` merges the finished branches into `dispatch/<project>/integration`
in a temporary worktree, reporting conflicts instead of stopping at them; the user's checkout is not touched.
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

from dispatch.core.errors import DispatchError
from dispatch.core.paths import remote_path

logger = logging.getLogger(__name__)

CONFLICT_EXIT_CODE = 3
"""Exit status of the prepare script when two dependency branches conflict (a deterministic failure)."""

GIT_NAME = "Oyster Dispatch"
GIT_EMAIL = "dispatch@localhost"
_INTEGRATION = "integration"
_COLLECT_NAMESPACE = "refs/remotes/dispatch-collect"
_GIT_TIMEOUT = 120.0
_FETCH_TIMEOUT = 600.0
_LOCK_WAIT_SECONDS = 900
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
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


def _check_ref_part(value: str, what: str, *, allow_slash: bool = False) -> None:
    """Raise ValueError unless `value` can be (part of) a branch name, as `git check-ref-format` says."""
    problem = None
    if not value:
        problem = "is empty"
    elif _FORBIDDEN.search(value):
        problem = "contains a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in value or "@{" in value or value == "@":
        problem = "contains '..' or '@{' (or is '@')"
    elif value.startswith("-"):
        problem = "starts with '-'"
    elif "/" in value and not allow_slash:
        problem = "contains '/' (it must be one path and ref component)"
    elif any(part == "" or part.startswith(".") or part.endswith(".lock") for part in value.split("/")):
        problem = "has an empty part, a part starting with '.' or a part ending in '.lock'"
    elif value.endswith("."):
        problem = "ends with '.'"
    if problem:
        raise ValueError(
            f"{what} {value!r} {problem}, so it cannot name a git branch; rename it using letters, digits "
            f"and - _ . only (e.g. 'S01-setup')")


def _check_task_id(task_id: str) -> None:
    _check_ref_part(task_id, "task_id")
    if task_id == _INTEGRATION:
        raise ValueError(f"task_id {task_id!r} is reserved for the collect branch; rename the spec")


def branch_name(project: str, task_id: str) -> str:
    """The branch a spec works on.

    Examples:
        >>> branch_name("demo", "S01-setup")
        'dispatch/demo/S01-setup'

    Raises:
        ValueError: if the project or task id cannot be part of a branch name.
    """
    _check_ref_part(project, "project")
    _check_task_id(task_id)
    return f"dispatch/{project}/{task_id}"


def worktree_path(root: str, project: str, task_id: str) -> str:
    """Where a spec's worktree lives on the node (relative roots are under the login's home).

    Raises:
        ValueError: if the project or task id cannot be part of a branch name.
    """
    branch_name(project, task_id)
    return remote_path(root, project, "worktrees", task_id)


def _shell_path(path: str) -> str:
    """`path` quoted for sh, keeping a leading `~` meaning the home directory."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


_PREAMBLE = """\
set -eu
unset CDPATH
die() {{ code=$1; shift; echo "dispatch git: $*" >&2; exit "$code"; }}
ROOT={root}
PROJECT={project}
TASK={task}
BRANCH={branch}
mkdir -p "$ROOT/$PROJECT/worktrees"
PROJECT_DIR=$(cd "$ROOT/$PROJECT" && pwd -P)
REPO="$PROJECT_DIR/repo"
WORKTREE="$PROJECT_DIR/worktrees/$TASK"
"""

# One clone serves every spec of the project on this node: hold its lock while touching it. Git runs with fd 9
# closed so a background `gc --auto` cannot keep holding the flock after the script ends.
_LOCK = """\
g() {{ git "$@" 9>&-; }}
if command -v flock >/dev/null 2>&1; then
  exec 9>"$PROJECT_DIR/repo.lock"
  flock -w {wait} 9 || die 1 "waited {wait} s for $PROJECT_DIR/repo.lock; is another dispatch stuck?"
else
  LOCKDIR="$PROJECT_DIR/repo.lock.d"
  waited=0
  until mkdir "$LOCKDIR" 2>/dev/null; do
    holder=$(cat "$LOCKDIR/pid" 2>/dev/null || true)
    if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null && mkdir "$LOCKDIR.break" 2>/dev/null; then
      # its holder died without unlocking: take it over, one breaker at a time, if nobody did already
      [ "$(cat "$LOCKDIR/pid" 2>/dev/null || true)" != "$holder" ] || rm -rf "$LOCKDIR"
      rmdir "$LOCKDIR.break"
      continue
    fi
    waited=$((waited + 1))
    [ "$waited" -lt {wait} ] || die 1 "waited {wait} s for $LOCKDIR (pid $holder); remove it if no dispatch runs"
    sleep 1
  done
  echo $$ >"$LOCKDIR/pid"
  trap 'rm -rf "$LOCKDIR"' EXIT
  trap 'exit 129' HUP
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
"""

_IDENTITY = """\
g -C "$REPO" config user.name >/dev/null || g -C "$REPO" config user.name {name}
g -C "$REPO" config user.email >/dev/null || g -C "$REPO" config user.email {email}
"""

_PREPARE = """\
URL={url}
MAIN={main}
if [ -d "$REPO/.git" ]; then
  g -C "$REPO" remote set-url origin "$URL"
  g -C "$REPO" fetch --quiet --prune origin >&2
else
  rm -rf "$REPO.partial"
  g clone --quiet --no-checkout "$URL" "$REPO.partial" >&2
  mv "$REPO.partial" "$REPO"
fi
{identity}g -C "$REPO" rev-parse -q --verify "refs/remotes/origin/$MAIN^{{commit}}" >/dev/null \\
  || die 1 "origin has no branch '$MAIN'; set main_branch in projects.json to the repository's main branch"
g -C "$REPO" worktree unlock "$WORKTREE" >/dev/null 2>&1 || true
if [ -e "$WORKTREE" ]; then  # left by an earlier attempt
  g -C "$REPO" worktree remove --force --force "$WORKTREE" >/dev/null 2>&1 || rm -rf "$WORKTREE"
fi
g -C "$REPO" worktree prune
g -C "$REPO" worktree add --quiet --force --no-track -B "$BRANCH" "$WORKTREE" "refs/remotes/origin/$MAIN" >&2
"""

_MERGE_DEPENDENCY = """\
DEP_BRANCH={dep_branch}
if g -C "$WORKTREE" rev-parse -q --verify "refs/remotes/origin/$DEP_BRANCH^{{commit}}" >/dev/null; then
  if ! g -C "$WORKTREE" merge --no-edit "refs/remotes/origin/$DEP_BRANCH" >&2; then
    files=$(g -C "$WORKTREE" diff --name-only --diff-filter=U | tr '\\n' ' ')
    g -C "$WORKTREE" merge --abort || true
    hint="the dependencies changed the same lines: make one spec depend on the other, or merge them by hand"
    die {conflict} "merging dependency branch $DEP_BRANCH into $BRANCH conflicts in: ${{files% }}; $hint"
  fi
else
  echo "dispatch git: dependency branch $DEP_BRANCH is not on origin (it changed nothing?); skipped" >&2
fi
"""

_FINISH = """\
MESSAGE={message}
[ -d "$WORKTREE" ] || die 1 "no worktree at $WORKTREE; the prepare script makes it"
{identity}cd "$WORKTREE"
g add -A
if g diff --cached --quiet; then
  echo "dispatch git: nothing to commit in $WORKTREE; pushing $BRANCH as it is" >&2
else
  g commit --quiet -m "$MESSAGE" >&2
fi
g push --quiet --force origin "HEAD:refs/heads/$BRANCH" >&2
g rev-parse HEAD
"""


def _preamble(root: str, project: str, task_id: str) -> str:
    branch = branch_name(project, task_id)
    return (_PREAMBLE.format(root=_shell_path(root), project=shlex.quote(project), task=shlex.quote(task_id),
                             branch=shlex.quote(branch))
            + _LOCK.format(wait=_LOCK_WAIT_SECONDS))


def _identity() -> str:
    return _IDENTITY.format(name=shlex.quote(GIT_NAME), email=shlex.quote(GIT_EMAIL))


def prepare_script(*, project: str, task_id: str, repo_url: str, main_branch: str, root: str,
                   dependencies: list[str]) -> str:
    """A POSIX sh script that makes the spec's worktree on a node and prints its path as the last line.

    Clones `repo_url` to `<root>/<project>/repo` the first time (fetches after), then (re)creates the worktree
    on branch `dispatch/<project>/<task_id>` from `origin/<main_branch>` and merges each dependency's branch
    that exists on origin. A conflict exits with `CONFLICT_EXIT_CODE`, naming the branch and the files.

    Args:
        project: the project name.
        task_id: the spec's id.
        repo_url: the repository the node clones and pushes to.
        main_branch: the branch specs start from.
        root: the node's run root (`~/...` and relative paths are under the login's home).
        dependencies: the task ids of the spec's `depends_on`, merged in this order.

    Returns:
        The script, for `sh -c`.

    Raises:
        ValueError: if a project, task id or branch name cannot make a git branch, or repo_url is empty.
    """
    _check_ref_part(main_branch, "main_branch", allow_slash=True)
    if not repo_url:
        raise ValueError("repo_url is empty; set repo_url in projects.json to the repository the nodes clone")
    script = _preamble(root, project, task_id)
    script += _PREPARE.format(url=shlex.quote(repo_url), main=shlex.quote(main_branch), identity=_identity())
    for dependency in dependencies:
        script += _MERGE_DEPENDENCY.format(dep_branch=shlex.quote(branch_name(project, dependency)),
                                           conflict=CONFLICT_EXIT_CODE)
    return script + 'printf "%s\\n" "$WORKTREE"\n'


def finish_script(*, project: str, task_id: str, root: str, message: str) -> str:
    """A POSIX sh script that commits the worktree's changes, force-pushes the branch and prints its commit.

    With nothing to commit it still pushes the branch (at its start point) so dependents find it.

    Args:
        project: the project name.
        task_id: the spec's id.
        root: the node's run root, as given to `prepare_script`.
        message: the commit message (an empty one becomes "dispatch/<project>/<task_id>").

    Returns:
        The script, for `sh -c`.

    Raises:
        ValueError: if the project or task id cannot make a git branch.
    """
    message = message if message.strip() else branch_name(project, task_id)
    return _preamble(root, project, task_id) + _FINISH.format(message=shlex.quote(message), identity=_identity())


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
    _check_ref_part(main_branch, "main_branch", allow_slash=True)
    branches = {task_id: branch_name(project, task_id) for task_id in task_ids}
    integration = f"dispatch/{project}/{_INTEGRATION}"
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
