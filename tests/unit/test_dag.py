"""Loading a project: dependency resolution, whole-project validation, critical path, cache keys, selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.core.dag import Project, load_project, select
from dispatch.core.errors import ProjectInvalid


def _spec(directory: Path, name: str, front: str = "", body: str = "Do the work.\n") -> Path:
    path = directory / name
    path.write_text(f"---\n{front}---\n{body}", encoding="utf-8")
    return path


def _load(directory: Path, name: str = "shop") -> Project:
    return load_project(name, directory)


def _errors(directory: Path) -> list[tuple[str, str, str]]:
    with pytest.raises(ProjectInvalid) as info:
        _load(directory)
    return [(Path(e.path).name, e.field, e.message) for e in info.value.errors]


@pytest.fixture()
def chain(tmp_path: Path) -> Path:
    """S01 <- S02 <- S03, S01 <- S04, and S05 on its own."""
    _spec(tmp_path, "S01-setup.md")
    _spec(tmp_path, "S02-db.md", "depends_on: [S01-setup]\n")
    _spec(tmp_path, "S03-api.md", "depends_on: [S02-db]\n")
    _spec(tmp_path, "S04-docs.md", "depends_on: [S01-setup]\n")
    _spec(tmp_path, "S05-lint.md")
    return tmp_path


# -- loading -------------------------------------------------------------------------------------------------


def test_load_project_orders_dependencies_first_and_keeps_context_apart(chain: Path) -> None:
    (chain / "SHARED_CONTEXT.md").write_text("Shared notes.\n", encoding="utf-8")
    (chain / "CLAUDE.md").write_text("Be careful.\n", encoding="utf-8")

    project = _load(chain)

    assert set(project.specs) == {"S01-setup", "S02-db", "S03-api", "S04-docs", "S05-lint"}
    position = {task_id: index for index, task_id in enumerate(project.order)}
    for spec in project.specs.values():
        for dep in spec.depends_on:
            assert position[dep] < position[spec.task_id]
    assert [p.name for p in project.context] == ["CLAUDE.md", "SHARED_CONTEXT.md"]


def test_missing_spec_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProjectInvalid) as info:
        load_project("shop", tmp_path / "nope")

    assert [e.field for e in info.value.errors] == ["project"]
    assert "no such spec directory" in info.value.errors[0].message


def test_directory_with_only_context_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "SHARED_CONTEXT.md").write_text("notes\n", encoding="utf-8")

    with pytest.raises(ProjectInvalid) as info:
        _load(tmp_path)

    assert [e.field for e in info.value.errors] == ["project"]
    assert "no spec files" in info.value.errors[0].message


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    assert [field for _, field, _ in _errors(tmp_path)] == ["project"]


# -- dependency resolution -----------------------------------------------------------------------------------


def test_unknown_dependency_is_an_error_listing_the_known_ids(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-setup.md")
    _spec(tmp_path, "S02-db.md", "depends_on: [S09-missing]\n")

    [(name, field, message)] = _errors(tmp_path)

    assert (name, field) == ("S02-db.md", "depends_on")
    assert "S09-missing" in message
    assert "S01-setup" in message and "S02-db" in message


def test_a_unique_prefix_resolves_to_the_full_id(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-setup.md")
    _spec(tmp_path, "S02-db.md", "depends_on: [S01]\n")

    project = _load(tmp_path)

    assert project.specs["S02-db"].depends_on == ["S01-setup"]


def test_depends_on_as_one_string_resolves_like_a_list(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-setup.md")
    _spec(tmp_path, "S02-db.md", "depends_on: S01\n")

    assert _load(tmp_path).specs["S02-db"].depends_on == ["S01-setup"]


def test_a_prefix_must_end_at_a_non_alphanumeric_boundary(tmp_path: Path) -> None:
    _spec(tmp_path, "S10-x.md")
    _spec(tmp_path, "S2-y.md", "depends_on: [S1]\n")

    [(name, field, message)] = _errors(tmp_path)

    assert (name, field) == ("S2-y.md", "depends_on")
    assert "'S1'" in message and "S10-x" in message  # unknown, and the known ids are listed


def test_boundary_rule_picks_the_one_true_prefix_match(tmp_path: Path) -> None:
    _spec(tmp_path, "S1-a.md")
    _spec(tmp_path, "S10-b.md")
    _spec(tmp_path, "S11-c.md", "depends_on: [S1]\n")

    assert _load(tmp_path).specs["S11-c"].depends_on == ["S1-a"]


def test_an_exact_id_wins_over_longer_ids_it_prefixes(tmp_path: Path) -> None:
    _spec(tmp_path, "S01.md")
    _spec(tmp_path, "S01-extra.md")
    _spec(tmp_path, "S02.md", "depends_on: [S01]\n")

    assert _load(tmp_path).specs["S02"].depends_on == ["S01"]


def test_an_ambiguous_prefix_is_an_error_naming_the_candidates(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md")
    _spec(tmp_path, "S01-b.md")
    _spec(tmp_path, "S02-c.md", "depends_on: [S01]\n")

    [(name, field, message)] = _errors(tmp_path)

    assert (name, field) == ("S02-c.md", "depends_on")
    assert "ambiguous" in message and "S01-a" in message and "S01-b" in message


def test_a_dependency_listed_twice_counts_once(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-setup.md")
    _spec(tmp_path, "S02-db.md", "depends_on: [S01, S01-setup]\n")

    assert _load(tmp_path).specs["S02-db"].depends_on == ["S01-setup"]


# -- structural errors ---------------------------------------------------------------------------------------


def test_a_cycle_is_an_error_that_prints_the_cycle(tmp_path: Path) -> None:
    _spec(tmp_path, "S01.md", "depends_on: [S02]\n")
    _spec(tmp_path, "S02.md", "depends_on: [S01]\n")

    [(_, field, message)] = _errors(tmp_path)

    assert field == "depends_on"
    assert "S01 -> S02 -> S01" in message


def test_a_longer_cycle_behind_a_tail_prints_only_the_cycle(tmp_path: Path) -> None:
    _spec(tmp_path, "S00.md", "depends_on: [S01]\n")
    _spec(tmp_path, "S01.md", "depends_on: [S02]\n")
    _spec(tmp_path, "S02.md", "depends_on: [S03]\n")
    _spec(tmp_path, "S03.md", "depends_on: [S01]\n")

    [(_, field, message)] = _errors(tmp_path)

    assert field == "depends_on"
    assert "S01 -> S02 -> S03 -> S01" in message
    assert "S00" not in message


def test_a_duplicate_id_is_an_error_naming_both_files(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", "task_id: api\n")
    _spec(tmp_path, "S02-b.md", "task_id: api\n")

    [(name, field, message)] = _errors(tmp_path)

    assert (name, field) == ("S02-b.md", "task_id")
    assert "api" in message and "S01-a.md" in message


def test_a_self_dependency_is_an_error(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", "depends_on: [S01-a]\n")

    [(name, field, message)] = _errors(tmp_path)

    assert (name, field) == ("S01-a.md", "depends_on")
    assert "itself" in message


def test_a_spec_naming_another_project_is_an_error(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", "project: other\n")

    [(name, field, _)] = _errors(tmp_path)

    assert (name, field) == ("S01-a.md", "project")


def test_a_spec_naming_its_own_project_loads(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", "project: shop\n")

    assert _load(tmp_path).specs["S01-a"].project == "shop"


def test_every_error_of_a_project_is_reported_at_once(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-ok.md")
    _spec(tmp_path, "S02-yaml.md", "depends_on: [S01\n")
    _spec(tmp_path, "S03-prio.md", "priority: high\n")
    _spec(tmp_path, "S04-dep.md", "depends_on: [S99]\n")
    _spec(tmp_path, "S05-empty.md", body="")
    _spec(tmp_path, "S06-loop.md", "depends_on: [S07]\n")
    _spec(tmp_path, "S07-loop.md", "depends_on: [S06]\n")
    (tmp_path / "S08-latin1.md").write_bytes(b"---\n---\nCaf\xe9\n")

    errors = _errors(tmp_path)

    assert {(name, field) for name, field, _ in errors} == {
        ("S02-yaml.md", "front matter"),
        ("S03-prio.md", "priority"),
        ("S04-dep.md", "depends_on"),
        ("S05-empty.md", "body"),
        ("S06-loop.md", "depends_on"),
        ("S08-latin1.md", "file"),
    }
    assert len(errors) == 6


def test_project_invalid_message_lists_every_error(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", "priority: high\n")
    _spec(tmp_path, "S02-b.md", "retries: lots\n")

    with pytest.raises(ProjectInvalid) as info:
        _load(tmp_path)

    text = str(info.value)
    assert "2 error(s)" in text
    assert "S01-a.md: priority" in text and "S02-b.md: retries" in text


# -- critical path -------------------------------------------------------------------------------------------


def test_critical_path_is_the_longest_remaining_chain_including_the_spec(chain: Path) -> None:
    project = _load(chain)

    assert project.critical_path() == {
        "S01-setup": 3.0, "S02-db": 2.0, "S03-api": 1.0, "S04-docs": 1.0, "S05-lint": 1.0,
    }


def test_critical_path_uses_weights(chain: Path) -> None:
    project = _load(chain)

    lengths = project.critical_path({"S04-docs": 10.0, "S03-api": 2.0})

    assert lengths["S01-setup"] == 11.0  # 1 + S04-docs 10 beats 1 + 1 + 2
    assert lengths["S02-db"] == 3.0
    assert lengths["S05-lint"] == 1.0


# -- cache keys ----------------------------------------------------------------------------------------------


def test_cache_keys_are_stable_when_nothing_changed(chain: Path) -> None:
    assert _load(chain).cache_keys("rev1") == _load(chain).cache_keys("rev1")


def test_editing_a_spec_changes_exactly_its_key_and_its_descendants_keys(chain: Path) -> None:
    before = _load(chain).cache_keys("rev1")
    _spec(chain, "S02-db.md", "depends_on: [S01-setup]\n", body="Do the work, with an index.\n")

    after = _load(chain).cache_keys("rev1")

    changed = {task_id for task_id in before if before[task_id] != after[task_id]}
    assert changed == {"S02-db", "S03-api"}


def test_editing_a_root_spec_changes_every_descendant_key(chain: Path) -> None:
    before = _load(chain).cache_keys()
    _spec(chain, "S01-setup.md", body="Set up, differently.\n")

    after = _load(chain).cache_keys()

    assert {t for t in before if before[t] != after[t]} == {"S01-setup", "S02-db", "S03-api", "S04-docs"}


def test_a_new_revision_changes_every_key(chain: Path) -> None:
    project = _load(chain)

    one, two = project.cache_keys("rev1"), project.cache_keys("rev2")

    assert all(one[task_id] != two[task_id] for task_id in one)


def test_the_same_ids_in_two_projects_have_different_keys(chain: Path) -> None:
    assert _load(chain, "shop").cache_keys()["S01-setup"] != _load(chain, "blog").cache_keys()["S01-setup"]


# -- select --------------------------------------------------------------------------------------------------


def test_select_everything_by_default(chain: Path) -> None:
    project = _load(chain)

    assert select(project) == set(project.specs)


def test_select_only_takes_the_specs_and_what_they_need(chain: Path) -> None:
    assert select(_load(chain), only=["S03-api"]) == {"S01-setup", "S02-db", "S03-api"}


def test_select_start_from_takes_the_specs_and_their_dependents(chain: Path) -> None:
    assert select(_load(chain), start_from=["S02"]) == {"S02-db", "S03-api"}


def test_select_only_and_start_from_intersect(chain: Path) -> None:
    assert select(_load(chain), only=["S03"], start_from=["S02"]) == {"S02-db", "S03-api"}


def test_select_an_unknown_name_is_an_error(chain: Path) -> None:
    with pytest.raises(ProjectInvalid) as info:
        select(_load(chain), only=["S42"])

    assert [e.field for e in info.value.errors] == ["--only"]
    assert "S42" in info.value.errors[0].message


# -- hostile input -------------------------------------------------------------------------------------------


def test_ids_differing_only_in_case_are_an_error_naming_both_files(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", "task_id: Build\n")
    _spec(tmp_path, "S02-b.md", "task_id: build\n")

    errors = _errors(tmp_path)

    assert [(name, field) for name, field, _ in errors] == [("S02-b.md", "task_id")]
    assert "'Build'" in errors[0][2] and "S01-a.md" in errors[0][2] and "case" in errors[0][2]


@pytest.mark.parametrize("name", ["../other", ".", "..", "-rf", "a/b", "x" * 101])
def test_a_project_name_outside_the_pattern_is_an_error(tmp_path: Path, name: str) -> None:
    _spec(tmp_path, "S01-a.md")

    with pytest.raises(ProjectInvalid) as info:
        load_project(name, tmp_path)

    assert [e.field for e in info.value.errors] == ["project"]


@pytest.mark.parametrize("context", ["SHARED_CONTEXT.md", "CLAUDE.md"])
def test_a_context_file_linked_out_of_the_spec_directory_is_an_error(tmp_path: Path, context: str) -> None:
    specs = tmp_path / "shop"
    specs.mkdir()
    _spec(specs, "S01-a.md")
    (tmp_path / "secret.md").write_text("TOPSECRET\n", encoding="utf-8")
    (specs / context).symlink_to(tmp_path / "secret.md")

    with pytest.raises(ProjectInvalid) as info:
        load_project("shop", specs)

    assert [(Path(e.path).name, e.field) for e in info.value.errors] == [(context, "file")]
    assert "symbolic link" in info.value.errors[0].message and "TOPSECRET" not in str(info.value)


def test_a_context_file_over_1_mib_is_an_error(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md")
    with open(tmp_path / "SHARED_CONTEXT.md", "wb") as handle:
        handle.truncate((1 << 20) + 1)

    errors = _errors(tmp_path)

    assert [(name, field) for name, field, _ in errors] == [("SHARED_CONTEXT.md", "file")]
    assert "1 MiB" in errors[0][2]


def test_a_spec_directory_linked_into_the_specs_root_loads_and_its_files_stay_inside_it(tmp_path: Path) -> None:
    real = tmp_path / "repo-specs"
    real.mkdir()
    _spec(real, "S01-a.md")
    (real / "SHARED_CONTEXT.md").write_text("notes\n", encoding="utf-8")
    (tmp_path / "linked").symlink_to(real)

    project = load_project("linked", tmp_path / "linked")

    assert list(project.specs) == ["S01-a"] and [p.name for p in project.context] == ["SHARED_CONTEXT.md"]


def test_long_values_are_cut_in_dependency_and_project_messages(tmp_path: Path) -> None:
    _spec(tmp_path, "S01-a.md", f"depends_on: [{'S' * 50_000}]\n")
    _spec(tmp_path, "S02-b.md", f"project: {'p' * 50_000}\n")

    errors = _errors(tmp_path)

    assert [(name, field) for name, field, _ in errors] == [("S02-b.md", "project"), ("S01-a.md", "depends_on")]
    assert all(len(message) < 400 and "…" in message for _, _, message in errors)
