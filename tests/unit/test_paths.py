"""The one path builder: names by the documented pattern, local paths proven inside their root (symlinks
resolved), remote paths built from checked components and quoted, and values cut in messages."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from dispatch.core.errors import DispatchError, UnsafePath, cut
from dispatch.core.paths import (
    check_name,
    local_path,
    name_problem,
    read_bounded,
    remote_arg,
    remote_path,
    run_dir_parts,
)

# -- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["S01-setup", "S1", "a", "P02_plan.v2", "_private", "x" * 100, "demo", "9lives"])
def test_names_of_letters_digits_dot_underscore_dash_are_valid(name: str) -> None:
    assert name_problem(name) is None
    assert check_name(name, "task_id") == name


@pytest.mark.parametrize("name", [
    "", ".", "..", ".hidden", "-rf", "--all", "a/b", "../x", "/tmp/x", "a\\b", "x" * 101, "a b", "a\nb", "a\0b",
    "ü", "S01~", "$HOME", "a;b", "'a'",
])
def test_names_outside_the_pattern_are_refused(name: str) -> None:
    assert name_problem(name)
    with pytest.raises(UnsafePath) as info:
        check_name(name, "project")
    assert isinstance(info.value, DispatchError)
    assert "project" in str(info.value)


def test_the_documented_pattern_and_the_check_agree() -> None:
    import re

    from dispatch.core.paths import NAME_PATTERN

    for name in ["S01", "a", "x" * 100, "x" * 101, ".a", "-a", "_a", "a.b-c_d", "a b", "a/b", "", "ü", "9"]:
        assert (name_problem(name) is None) == bool(re.fullmatch(NAME_PATTERN, name)), name


def test_a_refused_name_is_quoted_cut_in_the_message() -> None:
    with pytest.raises(UnsafePath) as info:
        check_name("../" * 1000, "task_id")

    assert len(str(info.value)) < 400
    assert "…" in str(info.value)


# -- local paths ---------------------------------------------------------------------------------------------


def test_local_path_joins_plain_components_under_the_root(tmp_path: Path) -> None:
    assert local_path(tmp_path, "runs", "shop", "tasks", "S01") == tmp_path / "runs" / "shop" / "tasks" / "S01"


@pytest.mark.parametrize("parts", [("..",), ("runs", ".."), ("a/../..",), ("/etc",), ("",), (".",), ("a\0b",),
                                   ("runs", "../../x")])
def test_local_path_refuses_components_that_are_not_one_plain_name(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(UnsafePath):
        local_path(tmp_path, *parts)


def test_local_path_refuses_a_symlink_that_leads_out_of_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "state", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "runs").symlink_to(outside)

    with pytest.raises(UnsafePath) as info:
        local_path(root, "runs", "shop")

    assert "outside" in str(info.value) and str(root) in str(info.value)


def test_local_path_allows_a_symlink_that_stays_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")

    assert local_path(tmp_path, "alias", "x") == tmp_path / "alias" / "x"


def test_local_path_with_a_linked_last_component_allows_only_that_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "spec-root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "shop").symlink_to(outside)
    (tmp_path / "link-out").symlink_to(outside)
    (root / "deep").symlink_to(tmp_path / "link-out")

    assert local_path(root, "shop", allow_link=True) == root / "shop"
    with pytest.raises(UnsafePath):
        local_path(root, "shop")  # without allow_link the directory itself must stay inside
    with pytest.raises(UnsafePath):
        local_path(root, "shop", "x", allow_link=True)  # only a last component may be a link


def test_local_path_of_a_root_that_is_itself_a_symlink_resolves_the_root_first(tmp_path: Path) -> None:
    (tmp_path / "real-home").mkdir()
    (tmp_path / "linked-home").symlink_to(tmp_path / "real-home")

    assert local_path(tmp_path / "linked-home", "runs") == tmp_path / "linked-home" / "runs"


def test_run_dir_parts_check_project_and_task_id() -> None:
    assert run_dir_parts("shop", "S01") == ("shop", "tasks", "S01")
    with pytest.raises(UnsafePath, match="task_id"):
        run_dir_parts("shop", "../../x")
    with pytest.raises(UnsafePath, match="project"):
        run_dir_parts("..", "S01")


# -- remote paths --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", ["dispatch", "/srv/dispatch", "~/dispatch", "."])
def test_remote_path_joins_checked_components(root: str) -> None:
    assert remote_path(root, "shop", "tasks", "S01") == f"{root}/shop/tasks/S01"


@pytest.mark.parametrize("parts", [("..",), ("shop", "../.."), ("a/b",), ("",), (".",), ("a\nb",), ("a\0b",)])
def test_remote_path_refuses_components_that_are_not_one_plain_name(parts: tuple[str, ...]) -> None:
    with pytest.raises(UnsafePath):
        remote_path("dispatch", *parts)


@pytest.mark.parametrize("root", ["", "dispatch/../..", "../x", "a\nb"])
def test_remote_path_refuses_a_root_that_climbs_or_is_empty(root: str) -> None:
    with pytest.raises(UnsafePath):
        remote_path(root, "shop")


def test_remote_arg_is_one_shell_word_even_with_spaces_and_quotes(tmp_path: Path) -> None:
    arg = remote_arg(str(tmp_path), "it's a $(touch pwned) dir")

    assert shlex.split(arg) == [f"{tmp_path}/it's a $(touch pwned) dir"]
    out = subprocess.run(["sh", "-c", f"printf %s {arg}"], capture_output=True, text=True, cwd=tmp_path).stdout
    assert out == f"{tmp_path}/it's a $(touch pwned) dir"
    assert not (tmp_path / "pwned").exists()


# -- bounded reads -------------------------------------------------------------------------------------------


def test_read_bounded_reads_a_file_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "S01.md").write_bytes(b"hello")

    assert read_bounded(tmp_path, tmp_path / "S01.md", limit=10) == b"hello"


def test_read_bounded_reads_at_most_limit_plus_one_bytes_of_a_big_file(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "S01.md"
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)  # sparse

    tracemalloc.start()
    try:
        data = read_bounded(tmp_path, path, limit=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert len(data) == 1025
    assert peak < 1 << 20, f"{peak} bytes allocated reading 1 KiB"


def test_read_bounded_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "spec-root"
    root.mkdir()
    (tmp_path / "secret").write_text("x")
    (root / "S01.md").symlink_to(tmp_path / "secret")

    with pytest.raises(UnsafePath, match="symbolic link"):
        read_bounded(root, root / "S01.md", limit=10)


def test_read_bounded_follows_a_symlink_that_stays_inside(tmp_path: Path) -> None:
    (tmp_path / "S01.md").write_bytes(b"same")
    (tmp_path / "S02.md").symlink_to(tmp_path / "S01.md")

    assert read_bounded(tmp_path, tmp_path / "S02.md", limit=10) == b"same"


def test_read_bounded_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "S01.md")  # opening a FIFO for reading would block forever

    with pytest.raises(UnsafePath, match="regular file"):
        read_bounded(tmp_path, tmp_path / "S01.md", limit=10)


# -- values in messages --------------------------------------------------------------------------------------


def test_cut_keeps_short_values_as_repr() -> None:
    assert cut("S01") == "'S01'"
    assert cut([1, "a"]) == "[1, 'a']"


def test_cut_bounds_long_and_huge_nested_values_without_expanding_them() -> None:
    leaf = ["lol"] * 9
    for _ in range(9):
        leaf = [leaf] * 9  # 9**10 strings if repr() expanded it

    for value in ("y" * 100_000, leaf, {"k" * 500: "v"}, 7 ** 5000):
        text = cut(value)
        assert len(text) <= 81 and text.endswith("…")


# -- every builder goes through the checks -------------------------------------------------------------------


@pytest.mark.parametrize("project", ["../other/specs", "..", ".", "-rf", "/etc", "a/b"])
def test_settings_refuse_a_project_name_that_is_no_name(project: str) -> None:
    from dispatch.core.settings import get_settings

    settings = get_settings()
    for build in (settings.specs_root_for, settings.code_dir_for, lambda p: settings.project_dir("runs", p)):
        with pytest.raises(UnsafePath, match="project name"):
            build(project)


def test_settings_allow_a_spec_directory_linked_into_the_specs_root(isolated_home: Path) -> None:
    from dispatch.core.settings import get_settings

    (isolated_home / "repo-specs").mkdir()
    (isolated_home / "specs" / "shop").symlink_to(isolated_home / "repo-specs")

    assert get_settings().specs_root_for("shop") == isolated_home / "specs" / "shop"


def test_a_runs_directory_linked_out_of_the_home_is_refused(isolated_home: Path) -> None:
    from dispatch.core.settings import get_settings

    (isolated_home / "elsewhere").mkdir()
    (isolated_home / "home" / "runs").symlink_to(isolated_home / "elsewhere")

    with pytest.raises(UnsafePath, match="outside"):
        get_settings().project_dir("runs", "shop")


def test_state_files_are_named_by_checked_project_names(isolated_home: Path) -> None:
    from dispatch.core.results import ProjectState, load_all_states, save_state, state_path

    state_dir = isolated_home / "home" / "state"
    with pytest.raises(UnsafePath):
        state_path(state_dir, "../../x")
    save_state(state_dir, ProjectState(project="shop"))
    (state_dir / "not a project.json").write_text("{}")  # a stray file is no project: skipped, no crash

    assert [s.project for s in load_all_states(state_dir)] == ["shop"]


@pytest.mark.parametrize(("project", "task_id"), [("shop", "../../../../x"), ("shop", "/tmp/x"), ("..", "S01"),
                                                  ("shop", "."), ("shop", "x" * 300)])
def test_local_run_directories_refuse_names_that_are_no_names(tmp_path: Path, project: str, task_id: str) -> None:
    from dispatch.cluster.transports.local import LocalTransport, run_dir_for

    with pytest.raises(UnsafePath):
        run_dir_for(tmp_path, project, task_id)
    if task_id == "S01":
        with pytest.raises(UnsafePath):
            LocalTransport(tmp_path).kill_project(project)
        with pytest.raises(UnsafePath):
            LocalTransport(tmp_path).adoptable_runs(project)


def test_remote_run_directories_are_checked_before_any_command(tmp_path: Path) -> None:
    from dispatch.cluster.ssh import SSHPool
    from dispatch.cluster.transports.ssh import SSHTransport
    from dispatch.core.nodes import Node

    # nothing listens on this address: any command would fail with NodeError, not UnsafePath
    node = Node(name="n1", slots=1, host="127.0.0.77", port=9, known_hosts=str(tmp_path / "known_hosts"))
    with SSHPool() as pool:
        transport = SSHTransport(node, pool)
        assert transport.run_dir("shop", "S01") == "dispatch/shop/tasks/S01"
        assert transport.workdir("shop", "S01") == "dispatch/shop/tasks/S01/work"
        for call in (lambda: transport.run_dir("shop", "../../x"), lambda: transport.workdir("..", "S01"),
                     lambda: transport.cleanup("../.."), lambda: transport.cleanup("."),
                     lambda: transport.kill_project("../x"), lambda: transport.adoptable_runs("/etc")):
            with pytest.raises(UnsafePath):
                call()
        assert pool.connections_opened == 0


def test_worktree_paths_are_built_from_checked_parts() -> None:
    from dispatch.cluster.gitsync import worktree_path

    assert worktree_path("~/dispatch", "shop", "S01") == "~/dispatch/shop/worktrees/S01"
    with pytest.raises(UnsafePath):
        worktree_path("dispatch/../..", "shop", "S01")


def test_collect_copies_changed_files_only_inside_code_and_results_directories(tmp_path: Path) -> None:
    from dispatch.cluster.collect import copy_changed_files

    code, files, outside = tmp_path / "code", tmp_path / "results" / "S01" / "files", tmp_path / "outside"
    (code / "src").mkdir(parents=True)
    outside.mkdir()
    (code / "src" / "a.py").write_text("a\n")
    (outside / "secret").write_text("TOPSECRET\n")
    (code / "leak").symlink_to(outside)  # a link the agent made in the code directory
    (code / "direct").symlink_to(outside / "secret")

    refused = copy_changed_files(code, files, ["src/a.py", "../outside/secret", "/etc/hostname", "leak/secret",
                                               "direct", "src/../../outside/secret", "", 7])

    assert (files / "src" / "a.py").read_text() == "a\n"
    assert sorted(p.relative_to(files).as_posix() for p in files.rglob("*")) == ["src", "src/a.py"]
    assert sorted(map(str, refused)) == sorted(["../outside/secret", "/etc/hostname", "leak/secret", "direct",
                                                "src/../../outside/secret", "", "7"])


def test_collect_never_writes_through_a_link_in_the_results_directory(tmp_path: Path) -> None:
    from dispatch.cluster.collect import copy_changed_files

    code, files, outside = tmp_path / "code", tmp_path / "files", tmp_path / "outside"
    (code / "docs").mkdir(parents=True)
    (code / "docs" / "x.md").write_text("x\n")
    files.mkdir()
    outside.mkdir()
    (files / "docs").symlink_to(outside)  # left by an earlier, hostile collect

    assert copy_changed_files(code, files, ["docs/x.md"]) == ["docs/x.md"]
    assert list(outside.iterdir()) == []


def test_the_spec_run_flow_refuses_a_workdir_outside_its_run_root(tmp_path: Path) -> None:
    import logging

    from dispatch.cluster.transports import RunRequest
    from dispatch.cluster.transports.local import LocalTransport
    from flows.spec_run import _attempt

    root = tmp_path / "runs"
    for workdir, task_id in ((tmp_path / "elsewhere", "S01"), (root / "shop" / ".." / ".." / "x", "S01"),
                             (root / "shop" / "tasks" / "S01" / "work", "../../../x")):
        request = RunRequest(project="shop", task_id=task_id, node="w1", cache_key="k", run_id="r",
                             workdir=str(workdir), root=str(root), steps=[{"name": "sh", "argv": ["true"]}],
                             timeout=10, stall_timeout=10)

        result = _attempt(request, LocalTransport(root, "w1"), logging.getLogger("test"), "w1:")

        assert (result.status, result.retryable) == ("failed", False) and "refused" in result.reason
    assert not root.exists() and not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("relative", ["/etc", "../x", "a/../../x", "link/x", "a\0b"])
def test_within_refuses_a_relative_path_that_leaves_its_root(tmp_path: Path, relative: str) -> None:
    from dispatch.core.paths import within

    root = tmp_path / "code"
    (root / "a").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        within(root, relative, what="frontend.serve")
    assert within(root, "a/../a", what="frontend.serve") == (root / "a").resolve()
