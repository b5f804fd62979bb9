"""Git mode on real git: prepare/finish scripts run by `sh -c` against a bare "remote" in tmp, and collect.

No network: the remote is a bare repository on disk, the node root and the user's clone are tmp dirs.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from pathlib import Path

import pytest

from dispatch.cluster.gitcollect import collect_branches
from dispatch.cluster.gitsync import (
    CONFLICT_EXIT_CODE,
    GIT_NAME,
    branch_name,
    finish_script,
    prepare_script,
    worktree_path,
)
from dispatch.core.errors import DispatchError

PROJECT = "demo"
# Only the test's own commits get this identity; the scripts must set theirs (HOME is isolated: no global one).
_TEST_IDENTITY = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                  "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def git(cwd: Path, *args: str) -> str:
    """Run git as the test (with an identity) and return its stdout."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **_TEST_IDENTITY})
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def sh(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare repository with one commit on main (README.md, shared.txt)."""
    seed = tmp_path / "seed"
    seed.mkdir()
    git(seed, "init", "-q", "-b", "main")
    (seed / "README.md").write_text("demo\n")
    (seed / "shared.txt").write_text("one\ntwo\nthree\n")
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "initial")
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(bare))
    return bare


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The node's run root, with characters that need quoting."""
    return tmp_path / "node root's $HOME"


def prepare(remote: Path, root: Path, task_id: str, dependencies: list[str] = (), *, main_branch: str = "main",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return sh(prepare_script(project=PROJECT, task_id=task_id, repo_url=str(remote), main_branch=main_branch,
                             root=str(root), dependencies=list(dependencies)), env)


def finish(root: Path, task_id: str, message: str = "agent work") -> subprocess.CompletedProcess:
    return sh(finish_script(project=PROJECT, task_id=task_id, root=str(root), message=message))


def run_spec(remote: Path, root: Path, task_id: str, files: dict[str, str], dependencies: list[str] = ()) -> str:
    """Prepare, "edit" files as an agent would, finish; the pushed commit."""
    prepared = prepare(remote, root, task_id, dependencies)
    assert prepared.returncode == 0, prepared.stderr
    worktree = Path(prepared.stdout.splitlines()[-1])
    for name, text in files.items():
        (worktree / name).write_text(text)
    finished = finish(root, task_id)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.splitlines()[-1]


def test_branch_and_worktree_names():
    assert branch_name("demo", "S01-setup") == "dispatch/demo/S01-setup"
    assert worktree_path("~/dispatch", "demo", "S01-setup") == "~/dispatch/demo/worktrees/S01-setup"


@pytest.mark.parametrize("task_id", ["S01 setup", "S01..x", "S01~1", "S01^", "a:b", "what?", "glob*", "br[ack",
                                     "back\\slash", "-flag", "S01.lock", ".hidden", "trailing.", "a/b", "",
                                     "at@{1}", "@", "tab\there", "integration"])
def test_task_ids_that_cannot_name_a_branch_are_rejected(task_id: str, remote: Path, root: Path):
    with pytest.raises(ValueError, match="rename"):
        branch_name(PROJECT, task_id)
    with pytest.raises(ValueError, match="rename"):
        prepare_script(project=PROJECT, task_id="S01", repo_url=str(remote), main_branch="main", root=str(root),
                       dependencies=[task_id])
    with pytest.raises(ValueError, match="rename"):
        finish_script(project=PROJECT, task_id=task_id, root=str(root), message="m")
    if task_id != "integration":
        with pytest.raises(ValueError, match="project"):
            branch_name(task_id, "S01")


def test_prepare_and_finish_push_the_spec_branch(remote: Path, root: Path, tmp_path: Path):
    task_id = "S01-it's$(touch${IFS}pwned)`touch${IFS}pwned`"
    prepared = prepare(remote, root, task_id)
    assert prepared.returncode == 0, prepared.stderr
    worktree = Path(prepared.stdout.splitlines()[-1])
    assert worktree == Path(worktree_path(str(root), PROJECT, task_id)).resolve()
    assert git(worktree, "branch", "--show-current") == branch_name(PROJECT, task_id)
    assert (worktree / "README.md").read_text() == "demo\n"
    (worktree / "feature.txt").write_text("made by the agent\n")
    (worktree / "README.md").write_text("demo, edited\n")

    finished = finish(root, task_id, message="S01: add a feature")
    assert finished.returncode == 0, finished.stderr
    sha = finished.stdout.splitlines()[-1]
    assert git(remote, "rev-parse", f"refs/heads/{branch_name(PROJECT, task_id)}") == sha
    assert git(remote, "show", f"{sha}:feature.txt") == "made by the agent"
    assert git(remote, "log", "-1", "--format=%s|%an", sha) == f"S01: add a feature|{GIT_NAME}"
    assert git(remote, "rev-parse", "refs/heads/main") == git(remote, "rev-parse", f"{sha}^")
    assert not list(tmp_path.rglob("pwned"))
    assert not (tmp_path / "user-home" / ".gitconfig").exists()  # identity set in the clone, never globally


def test_a_root_under_tilde_is_under_the_login_home(remote: Path, tmp_path: Path):
    prepared = sh(prepare_script(project=PROJECT, task_id="S01", repo_url=str(remote), main_branch="main",
                                 root="~/dispatch", dependencies=[]))
    assert prepared.returncode == 0, prepared.stderr
    home = Path(os.environ["HOME"]).resolve()
    assert Path(prepared.stdout.splitlines()[-1]) == home / "dispatch" / PROJECT / "worktrees" / "S01"


def test_finish_with_nothing_changed_still_pushes_the_branch(remote: Path, root: Path):
    assert prepare(remote, root, "S01").returncode == 0
    finished = finish(root, "S01")
    assert finished.returncode == 0, finished.stderr
    assert "nothing to commit" in finished.stderr
    assert finished.stdout.splitlines()[-1] == git(remote, "rev-parse", "main")
    assert git(remote, "rev-parse", "refs/heads/dispatch/demo/S01") == git(remote, "rev-parse", "main")


def test_dependent_starts_with_its_dependencies_branches_merged(remote: Path, root: Path):
    run_spec(remote, root, "S01", {"a.txt": "from S01\n"})
    run_spec(remote, root, "S02", {"b.txt": "from S02\n"})
    prepared = prepare(remote, root, "S03", ["S01", "S02", "S09-changed-nothing"])
    assert prepared.returncode == 0, prepared.stderr
    worktree = Path(prepared.stdout.splitlines()[-1])
    assert (worktree / "a.txt").read_text() == "from S01\n"
    assert (worktree / "b.txt").read_text() == "from S02\n"
    assert "dispatch/demo/S09-changed-nothing is not on origin" in prepared.stderr
    assert git(worktree, "branch", "--show-current") == "dispatch/demo/S03"


def test_retry_recreates_the_worktree_from_scratch(remote: Path, root: Path):
    first = prepare(remote, root, "S01")
    worktree = Path(first.stdout.splitlines()[-1])
    (worktree / "junk.txt").write_text("half-done\n")
    git(worktree, "add", "-A")
    git(worktree, "commit", "-q", "-m", "unpushed attempt")
    (worktree / "README.md").write_text("dirty\n")

    again = prepare(remote, root, "S01")
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.splitlines()[-1]) == worktree
    assert not (worktree / "junk.txt").exists()
    assert (worktree / "README.md").read_text() == "demo\n"
    assert git(worktree, "rev-parse", "HEAD") == git(remote, "rev-parse", "main")

    git(worktree.parent.parent / "repo", "worktree", "lock", str(worktree))  # even a locked, deleted one
    subprocess.run(["rm", "-rf", str(worktree)], check=True)
    third = prepare(remote, root, "S01")
    assert third.returncode == 0, third.stderr
    assert (worktree / "README.md").exists()


def _path_without_flock(tmp_path: Path) -> str:
    """A PATH with every command of the current one except `flock`."""
    bin_dir = tmp_path / "bin-without-flock"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            target = bin_dir / name
            if name != "flock" and not target.exists() and os.access(os.path.join(directory, name), os.X_OK):
                target.symlink_to(os.path.join(directory, name))
    return str(bin_dir)


@pytest.mark.parametrize("lock", ["flock", "mkdir"])
def test_concurrent_prepares_on_one_node_share_the_clone(lock: str, remote: Path, root: Path, tmp_path: Path):
    env = None if lock == "flock" else {**os.environ, "PATH": _path_without_flock(tmp_path)}
    if lock == "mkdir":  # a lock left by a killed script is taken over
        dead = subprocess.Popen(["true"])
        dead.wait()
        (root / PROJECT / "repo.lock.d").mkdir(parents=True)
        (root / PROJECT / "repo.lock.d" / "pid").write_text(f"{dead.pid}\n")
    results: dict[str, subprocess.CompletedProcess] = {}

    def one(task_id: str) -> None:
        results[task_id] = prepare(remote, root, task_id, env=env)

    threads = [threading.Thread(target=one, args=(f"S0{i}",)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for task_id, result in results.items():
        assert result.returncode == 0, f"{task_id}: {result.stderr}"
        assert git(Path(result.stdout.splitlines()[-1]), "branch", "--show-current") == f"dispatch/demo/{task_id}"
    assert len(results) == 4
    assert not (root / PROJECT / "repo.lock.d").exists()


def test_prepare_waits_for_the_project_lock(remote: Path, root: Path):
    (root / PROJECT).mkdir(parents=True)
    results: list[subprocess.CompletedProcess] = []
    with open(root / PROJECT / "repo.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: results.append(prepare(remote, root, "S01")))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not (root / PROJECT / "repo").exists()
    waiter.join(timeout=30)
    assert results and results[0].returncode == 0, results


def test_conflicting_dependencies_fail_prepare_naming_branch_and_files(remote: Path, root: Path):
    run_spec(remote, root, "S01", {"shared.txt": "one\nTWO by S01\nthree\n"})
    run_spec(remote, root, "S02", {"shared.txt": "one\nTWO by S02\nthree\n"})
    prepared = prepare(remote, root, "S03", ["S01", "S02"])
    assert prepared.returncode == CONFLICT_EXIT_CODE
    assert "dependency branch dispatch/demo/S02 into dispatch/demo/S03 conflicts in: shared.txt;" in prepared.stderr
    worktree = Path(worktree_path(str(root), PROJECT, "S03"))
    assert git(worktree, "status", "--porcelain") == ""  # the merge was aborted


def test_prepare_names_a_missing_main_branch(remote: Path, root: Path):
    prepared = prepare(remote, root, "S01", main_branch="trunk")
    assert prepared.returncode != 0
    assert "origin has no branch 'trunk'; set main_branch in projects.json" in prepared.stderr


@pytest.fixture
def user_clone(remote: Path, tmp_path: Path) -> Path:
    """The user's checkout: on a feature branch, with a modified file and an untracked one."""
    clone = tmp_path / "user"
    git(tmp_path, "clone", "-q", str(remote), str(clone))
    git(clone, "switch", "-q", "-c", "feature")
    (clone / "README.md").write_text("user's unsaved edit\n")
    (clone / "notes.txt").write_text("untracked\n")
    return clone


def test_collect_merges_branches_and_reports_a_conflict(remote: Path, root: Path, user_clone: Path):
    run_spec(remote, root, "S01", {"shared.txt": "one\nTWO by S01\nthree\n", "a.txt": "a\n"})
    run_spec(remote, root, "S02", {"b.txt": "b\n"})
    run_spec(remote, root, "S03", {"shared.txt": "one\nTWO by S03\nthree\n"})
    run_spec(remote, root, "S04", {"c.txt": "c\n"}, ["S01"])
    run_spec(remote, root, "S05", {})  # changed nothing: its branch is main
    status_before = git(user_clone, "status", "--porcelain")

    report = collect_branches(repo_local=user_clone, project=PROJECT, task_ids=["S01", "S02", "S03", "S04", "S05",
                                                                                "S06"],
                              main_branch="main", repo_url=str(remote))

    assert report.integration_branch == "dispatch/demo/integration"
    assert [(o.task_id, o.status) for o in report.outcomes] == [
        ("S01", "merged"), ("S02", "merged"), ("S03", "conflict"), ("S04", "merged"), ("S05", "up_to_date"),
        ("S06", "missing")]
    assert [(o.task_id, o.files) for o in report.conflicts()] == [("S03", ["shared.txt"])]
    assert "shared.txt" in report.conflicts()[0].message
    assert sorted(report.outcomes[0].files) == ["a.txt", "shared.txt"]
    assert report.outcomes[3].files == ["c.txt"]
    integration = report.integration_branch
    assert git(user_clone, "rev-parse", integration) == report.head
    assert git(user_clone, "show", f"{integration}:shared.txt") == "one\nTWO by S01\nthree"
    assert git(user_clone, "show", f"{integration}:b.txt") == "b"
    assert git(user_clone, "show", f"{integration}:c.txt") == "c"
    # the user's checkout is as it was, and no temporary worktree is left
    assert git(user_clone, "branch", "--show-current") == "feature"
    assert git(user_clone, "status", "--porcelain") == status_before
    assert (user_clone / "README.md").read_text() == "user's unsaved edit\n"
    assert len(git(user_clone, "worktree", "list").splitlines()) == 1

    again = collect_branches(repo_local=user_clone, project=PROJECT, task_ids=["S02"], main_branch="main",
                             repo_url=str(remote))
    assert [o.status for o in again.outcomes] == ["merged"]  # rebuilt from main, not stacked on the last one
    assert git(user_clone, "ls-tree", "--name-only", integration).split() == ["README.md", "b.txt", "shared.txt"]


def test_collect_without_repo_url_uses_fetched_branches(remote: Path, root: Path, user_clone: Path):
    run_spec(remote, root, "S01", {"a.txt": "a\n"})
    git(user_clone, "fetch", "-q", "origin")
    report = collect_branches(repo_local=user_clone, project=PROJECT, task_ids=["S01", "S02"], main_branch="main")
    assert [o.status for o in report.outcomes] == ["merged", "missing"]
    assert "no branch dispatch/demo/S02" in report.outcomes[1].message


def test_collect_refuses_to_rebuild_a_checked_out_integration_branch(remote: Path, user_clone: Path):
    git(user_clone, "switch", "-q", "-c", "dispatch/demo/integration")
    with pytest.raises(DispatchError, match="is checked out"):
        collect_branches(repo_local=user_clone, project=PROJECT, task_ids=["S01"], main_branch="main")


def test_collect_names_a_repo_local_that_is_not_a_repository(tmp_path: Path):
    with pytest.raises(DispatchError, match="not a git repository; set repo_local"):
        collect_branches(repo_local=tmp_path / "nowhere", project=PROJECT, task_ids=["S01"], main_branch="main")


def test_a_failing_git_command_reports_command_exit_code_and_stderr(user_clone: Path, tmp_path: Path):
    with pytest.raises(DispatchError, match=r"(?s)git exited 128: git -C .* fetch .*stderr \(tail\)"):
        collect_branches(repo_local=user_clone, project=PROJECT, task_ids=["S01"], main_branch="main",
                         repo_url=str(tmp_path / "no-such-remote.git"))
