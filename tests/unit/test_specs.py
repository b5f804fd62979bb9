"""Spec parsing: the old format unchanged, our optional fields, and every error named by file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.specs import context_files, is_spec_file, parse_duration, parse_spec, spec_files

OLD_SPEC = """\
---
task_id: S03-api
project: shop
priority: 1
depends_on: [S01-setup, S02-db]
modifies: [src/api.py, src/models/]
exclusive: true
executor: codex
---
## 目标
Write the API.

## 验收标准
- [ ] `pytest -q tests/test_api.py`
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _parse_ok(directory: Path, name: str, text: str):
    spec, errors = parse_spec(_write(directory, name, text))
    assert errors == []
    assert spec is not None
    return spec


def _fields(errors) -> set[str]:
    return {error.field for error in errors}


# -- which files are specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["S01-setup.md", "S1.md", "P02-plan.md", "S10_x.md", "P7 deploy.md",
                                  "F01-fix-cart.md", "F12.md"])
def test_files_named_s_p_or_f_digits_md_are_specs(name: str) -> None:
    assert is_spec_file(Path(name))


@pytest.mark.parametrize("name", [
    "SHARED_CONTEXT.md", "CLAUDE.md", "README.md", "Setup.md", "S01-setup.txt", "S01-setup.md.bak",
    "notes-S01.md", "SP1.md", "X01.md", "FIXES.md", "F-01.md",
])
def test_other_files_are_not_specs(name: str) -> None:
    assert not is_spec_file(Path(name))


def test_spec_files_lists_specs_sorted_and_context_files_the_other_markdown(tmp_path: Path) -> None:
    for name in ("S02-b.md", "S01-a.md", "P01-plan.md", "F01-fix.md", "SHARED_CONTEXT.md", "CLAUDE.md", "notes.txt"):
        _write(tmp_path, name, "---\n---\nbody\n")
    (tmp_path / "S99-dir.md").mkdir()  # a directory is never a spec

    assert [p.name for p in spec_files(tmp_path)] == ["F01-fix.md", "P01-plan.md", "S01-a.md", "S02-b.md"]
    assert [p.name for p in context_files(tmp_path)] == ["CLAUDE.md", "SHARED_CONTEXT.md"]


# -- the old system's fields ---------------------------------------------------------------------------------


def test_old_format_spec_parses_unchanged(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S03-api.md", OLD_SPEC)

    assert spec.task_id == "S03-api"
    assert spec.project == "shop"
    assert spec.priority == 1
    assert spec.depends_on == ["S01-setup", "S02-db"]
    assert spec.modifies == ["src/api.py", "src/models/"]
    assert spec.exclusive is True
    assert spec.executor == "codex"
    assert spec.model_chain == ["codex"]
    assert spec.kind == "agent"
    assert spec.acceptance == ["pytest -q tests/test_api.py"]
    assert spec.extra == {}
    assert "Write the API." in spec.body and "task_id" not in spec.body


def test_task_id_defaults_to_the_file_stem(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S07-package.md", "---\npriority: 3\n---\nPackage it.\n")

    assert spec.task_id == "S07-package"
    assert spec.priority == 3


def test_defaults_of_an_old_spec_with_few_fields(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", "---\nproject: shop\n---\nDo it.\n")

    assert (spec.priority, spec.depends_on, spec.modifies, spec.exclusive) == (2, [], [], False)
    assert spec.executor == "glm"
    assert spec.model_chain == ["glm"]
    assert (spec.timeout, spec.retries, spec.node, spec.labels) == (None, None, None, [])


def test_depends_on_as_a_single_string_is_a_one_item_list(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S02-b.md", "---\ndepends_on: S01\nmodifies: src/\n---\nDo it.\n")

    assert spec.depends_on == ["S01"]
    assert spec.modifies == ["src/"]


def test_a_spec_without_front_matter_uses_defaults_and_the_whole_file_as_body(tmp_path: Path) -> None:
    text = "# Goal\nTidy the README.\n\n## Acceptance criteria\n- [ ] `test -f README.md`\n"
    spec = _parse_ok(tmp_path, "S05-readme.md", text)

    assert spec.task_id == "S05-readme"
    assert spec.body == text
    assert spec.executor == "glm"
    assert spec.acceptance == ["test -f README.md"]


def test_content_hash_changes_when_the_file_changes(tmp_path: Path) -> None:
    first = _parse_ok(tmp_path, "S01-a.md", "---\n---\nDo it.\n")
    second = _parse_ok(tmp_path, "S01-a.md", "---\n---\nDo it better.\n")

    assert first.content_hash and first.content_hash != second.content_hash


# -- our fields ----------------------------------------------------------------------------------------------


def test_our_optional_fields_parse(tmp_path: Path) -> None:
    text = (
        "---\nmodel: [glm, minimax, claude]\ntimeout: 45m\nretries: 4\nnode: big-1\n"
        "labels: [gpu, fast]\nkind: agent\n---\nDo it.\n"
    )
    spec = _parse_ok(tmp_path, "S01-a.md", text)

    assert spec.models == ["glm", "minimax", "claude"]
    assert spec.model_chain == ["glm", "minimax", "claude"]
    assert spec.timeout == 45 * 60
    assert spec.retries == 4
    assert spec.node == "big-1"
    assert spec.labels == ["gpu", "fast"]


def test_verify_names_the_verifier_chain(tmp_path: Path) -> None:
    assert _parse_ok(tmp_path, "S01-a.md", "---\nverify: [codex, claude]\n---\nDo it.\n").verify == ["codex", "claude"]
    assert _parse_ok(tmp_path, "S02-a.md", "---\nverify: codex\n---\nDo it.\n").verify == ["codex"]
    assert _parse_ok(tmp_path, "S03-a.md", "---\nmodel: glm\n---\nDo it.\n").verify == []


def test_a_single_model_name_is_a_one_model_chain(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", "---\nmodel: claude\nexecutor: codex\n---\nDo it.\n")

    assert spec.model_chain == ["claude"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("45m", 2700.0), ("1h30m", 5400.0), ("90s", 90.0), ("90", 90.0), (90, 90.0), ("2h", 7200.0), ("1.5h", 5400.0),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["forever", "0m", "-5", 0, -3, True, "", "45 minutes", "1d", float("nan")])
def test_parse_duration_rejects_what_is_not_a_positive_duration(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("value", "seconds"), [("1h30m", 5400.0), ("90s", 90.0), ("45m", 2700.0)])
def test_timeout_field_accepts_durations(tmp_path: Path, value: str, seconds: float) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", f"---\ntimeout: {value}\n---\nDo it.\n")

    assert spec.timeout == seconds


def test_shell_spec_runs_its_fenced_bash_block(tmp_path: Path) -> None:
    text = "---\nkind: shell\n---\n## Steps\n```bash\nmake build\nmake test\n```\n\n```bash\necho second\n```\n"
    spec = _parse_ok(tmp_path, "S01-build.md", text)

    assert spec.kind == "shell"
    assert spec.script == "make build\nmake test\n"


def test_unknown_front_matter_fields_are_kept_in_extra(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", "---\nowner: alice\nestimate: 3\ntags: [x]\npriority: 2\n---\nDo it.\n")

    assert spec.extra == {"owner": "alice", "estimate": 3, "tags": ["x"]}


# -- errors: each names the file and the field ---------------------------------------------------------------


def test_priority_high_is_an_error_naming_file_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01-a.md", "---\npriority: high\n---\nDo it.\n")

    _, errors = parse_spec(path)

    assert len(errors) == 1
    assert errors[0].path == str(path)
    assert errors[0].field == "priority"
    assert "S01-a.md" in str(errors[0]) and "priority" in str(errors[0]) and "'high'" in str(errors[0])


@pytest.mark.parametrize(("line", "field"), [
    ("priority: 5", "priority"),
    ("depends_on: {S01: yes}", "depends_on"),
    ("modifies: 42", "modifies"),
    ("exclusive: maybe", "exclusive"),
    ("executor: [glm]", "executor"),
    ("model: {a: 1}", "model"),
    ("verify: {codex: yes}", "verify"),
    ("verify: [codex, [claude]]", "verify"),
    ("timeout: soon", "timeout"),
    ("retries: many", "retries"),
    ("retries: -1", "retries"),
    ("node: ''", "node"),
    ("labels: 3", "labels"),
    ("kind: robot", "kind"),
    ("task_id: ''", "task_id"),
    ("project: [a]", "project"),
])
def test_wrong_field_type_is_an_error_naming_that_field(tmp_path: Path, line: str, field: str) -> None:
    path = _write(tmp_path, "S01-a.md", f"---\n{line}\n---\nDo it.\n")

    _, errors = parse_spec(path)

    assert [(e.path, e.field) for e in errors] == [(str(path), field)]


def test_every_bad_field_of_one_file_is_reported(tmp_path: Path) -> None:
    _, errors = parse_spec(_write(tmp_path, "S01-a.md", "---\npriority: high\nretries: x\nkind: robot\n---\nDo.\n"))

    assert _fields(errors) == {"priority", "retries", "kind"}


def test_bad_yaml_is_an_error_and_no_spec(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01-a.md", "---\ntask_id: S01\ndepends_on: [S00\n---\nDo it.\n")

    spec, errors = parse_spec(path)

    assert spec is None
    assert [(e.path, e.field) for e in errors] == [(str(path), "front matter")]
    assert "bad YAML" in errors[0].message


def test_front_matter_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    spec, errors = parse_spec(_write(tmp_path, "S01-a.md", "---\n- a\n- b\n---\nDo it.\n"))

    assert spec is None and _fields(errors) == {"front matter"}


def test_unclosed_front_matter_is_an_error(tmp_path: Path) -> None:
    spec, errors = parse_spec(_write(tmp_path, "S01-a.md", "---\ntask_id: S01\nDo it.\n"))

    assert spec is None and _fields(errors) == {"front matter"}


def test_a_file_that_is_not_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "S01-a.md"
    path.write_bytes("---\ntask_id: S01\n---\nCafé\n".encode("latin-1"))

    spec, errors = parse_spec(path)

    assert spec is None
    assert [(e.path, e.field) for e in errors] == [(str(path), "file")]
    assert "UTF-8" in errors[0].message


def test_a_utf8_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "S01-a.md"
    path.write_bytes(b"\xef\xbb\xbf---\npriority: 1\n---\nDo it.\n")

    spec, errors = parse_spec(path)

    assert errors == [] and spec is not None and spec.priority == 1


@pytest.mark.parametrize("text", ["---\ntask_id: S01\n---\n", "---\ntask_id: S01\n---\n \n\n", ""])
def test_an_empty_body_is_an_error(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "S01-a.md", text)

    _, errors = parse_spec(path)

    assert [(e.path, e.field) for e in errors] == [(str(path), "body")]


def test_shell_spec_without_a_fenced_bash_block_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01-a.md", "---\nkind: shell\n---\n## Steps\nRun make.\n```python\nprint(1)\n```\n")

    spec, errors = parse_spec(path)

    assert [(e.path, e.field) for e in errors] == [(str(path), "body")]
    assert spec is not None and spec.script is None


def test_agent_spec_needs_no_bash_block(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", "---\nkind: agent\n---\nJust prose.\n")

    assert spec.script is None


def test_crlf_line_endings_parse_like_lf(tmp_path: Path) -> None:
    text = (
        "---\nkind: shell\nmodifies: [src/a.py]\n---\n## Steps\n```bash\nmake\n```\n\n"
        "## Acceptance criteria\n- [ ] `make check`\n"
    )
    path = tmp_path / "S01-a.md"
    path.write_bytes(text.replace("\n", "\r\n").encode())

    spec, errors = parse_spec(path)

    assert errors == []
    assert spec is not None
    assert spec.modifies == ["src/a.py"]
    assert spec.script == "make\n"  # no stray \r for bash to choke on
    assert spec.acceptance == ["make check"]


# -- acceptance commands -------------------------------------------------------------------------------------


def test_acceptance_commands_come_from_checkboxes_under_english_and_chinese_headings_only(tmp_path: Path) -> None:
    text = """\
## Goal
- [ ] `not-goal` is a checkbox outside the acceptance section

## Concrete changes
- [x] `not-changes`

## Acceptance criteria
- [ ] `pytest -q` passes
- [x] `ruff check .`
* [ ] `make lint` with a star bullet
- [ ] no command in backticks here
- plain bullet `not-a-checkbox`
Some prose `not-prose`.

## Do not do
- [ ] `git push --force`

## 验收标准
- [ ] `python -m app --selftest` 通过
"""
    spec = _parse_ok(tmp_path, "S01-a.md", text)

    assert spec.acceptance == ["pytest -q", "ruff check .", "make lint", "python -m app --selftest"]


def test_no_acceptance_heading_means_no_acceptance_commands(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", "## Goal\n- [ ] `make`\n")

    assert spec.acceptance == []


def test_acceptance_commands_under_a_subheading_of_acceptance_criteria_are_kept(tmp_path: Path) -> None:
    text = "## Acceptance criteria\n- [ ] `make a`\n### Unit tests\n- [ ] `pytest -q`\n## Do not do\n- [ ] `rm -rf /`\n"
    spec = _parse_ok(tmp_path, "S01-a.md", text)

    assert spec.acceptance == ["make a", "pytest -q"]


def test_comment_lines_inside_fenced_code_are_not_headings(tmp_path: Path) -> None:
    text = (
        "## Acceptance criteria\n- [ ] `make a`\n```bash\n# set up first\nmake setup\n```\n- [ ] `make b`\n"
        "## Concrete changes\n```bash\n# acceptance is checked later\n```\n- [ ] `rm -rf build`\n"
    )
    spec = _parse_ok(tmp_path, "S01-a.md", text)

    assert spec.acceptance == ["make a", "make b"]


def test_a_longer_fence_is_closed_only_by_a_fence_as_long(tmp_path: Path) -> None:
    text = ("---\nkind: agent\n---\n## Reproduce\n````text\n```\n## Acceptance criteria\n- [ ] `rm -rf ~`\n```\n"
            "````\n\n## Acceptance criteria\n- [ ] `pytest -q`\n")
    assert _parse_ok(tmp_path, "S01-a.md", text).acceptance == ["pytest -q"]
