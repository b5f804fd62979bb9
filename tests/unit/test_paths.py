"""The one path builder: names by the documented pattern, local paths proven inside their root (symlinks
resolved), remote paths built from checked components and quoted, and values cut in messages."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from dispatch.errors import DispatchError, UnsafePath, cut
from dispatch.paths import (
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
