"""Git mode: each spec works on its own branch `dispatch/<project>/<task_id>`, in its own worktree.

On a node (any machine with git and a POSIX sh), the dispatcher runs two scripts built here:

- `prepare_script` keeps one clone per project at `<root>/<project>/repo`, fetches, and makes the spec's
  worktree `<root>/<project>/worktrees/<task_id>` on its branch, started from `origin/<main_branch>` with the
  branches of the spec's dependencies merged in. A conflict between them fails it with exit code
  `CONFLICT_EXIT_CODE`, naming the branch and the files.
- `finish_script` commits what the agent changed and force-pushes the branch, so dependents find it.

Specs of one project on one node share the clone, so both scripts hold `<root>/<project>/repo.lock`
(`flock` where util-linux has it, else a `mkdir` lock with retry) while they touch it.

On the dispatcher, `collect_branches` (dispatch/cluster/gitcollect.py) merges the finished branches into
`dispatch/<project>/integration`.
"""

from __future__ import annotations

import re
import shlex

from dispatch.core.paths import remote_path

CONFLICT_EXIT_CODE = 3
"""Exit status of the prepare script when two dependency branches conflict (a deterministic failure)."""

GIT_NAME = "Oyster Dispatch"
GIT_EMAIL = "dispatch@localhost"
_INTEGRATION = "integration"
_LOCK_WAIT_SECONDS = 900
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_ref_part(value: str, what: str, *, allow_slash: bool = False) -> None:
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
    check_ref_part(task_id, "task_id")
    if task_id == _INTEGRATION:
        raise ValueError(f"task_id {task_id!r} is reserved for the collect branch; rename the spec")


def integration_branch(project: str) -> str:
    """The branch `collect_branches` merges a project's spec branches into."""
    return f"dispatch/{project}/{_INTEGRATION}"


def branch_name(project: str, task_id: str) -> str:
    """The branch a spec works on.

    Examples:
        >>> branch_name("demo", "S01-setup")
        'dispatch/demo/S01-setup'

    Raises:
        ValueError: if the project or task id cannot be part of a branch name.
    """
    check_ref_part(project, "project")
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
    check_ref_part(main_branch, "main_branch", allow_slash=True)
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
