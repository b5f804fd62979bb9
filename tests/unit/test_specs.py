"""Spec parsing: the old format unchanged, our optional fields, and every error named by file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.core.specs import context_files, is_spec_file, parse_duration, parse_spec, spec_files

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


# -- hostile input: names, modifies, links, sizes, YAML bombs ------------------------------------------------


@pytest.mark.parametrize("task_id", ["/tmp/x", "../../../../tmp/x", "x" * 300, ".", "..", ".hidden", "-rf",
                                     "a b", "a/b", "S01\nS02", "ü"])
def test_a_task_id_outside_the_name_pattern_is_an_error_naming_file_and_field(tmp_path: Path, task_id: str) -> None:
    import json

    path = _write(tmp_path, "S01-a.md", f"---\ntask_id: {json.dumps(task_id)}\n---\nDo it.\n")

    spec, errors = parse_spec(path)

    assert [(e.path, e.field) for e in errors] == [(str(path), "task_id")]
    assert "letters, digits" in errors[0].message and len(errors[0].message) < 300


def test_a_file_name_that_is_no_valid_id_needs_a_task_id(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01 a b.md", "---\n---\nDo it.\n")

    _, errors = parse_spec(path)

    assert [(e.path, e.field) for e in errors] == [(str(path), "task_id")]
    assert "rename the file or set task_id" in errors[0].message
    assert _parse_ok(tmp_path, "S02 c.md", "---\ntask_id: S02-c\n---\nDo it.\n").task_id == "S02-c"


@pytest.mark.parametrize("entry", ["/etc/shadow", "../../etc", "/", "~/.ssh", "~", "src/../../x", "", "  ",
                                   "..\\..\\etc", "a\0b"])
def test_modifies_outside_the_repository_is_an_error_naming_file_and_field(tmp_path: Path, entry: str) -> None:
    import json

    path = _write(tmp_path, "S01-a.md", f"---\nmodifies: [src/ok.py, {json.dumps(entry)}]\n---\nDo it.\n")

    _, errors = parse_spec(path)

    assert [(e.path, e.field) for e in errors] == [(str(path), "modifies")]


@pytest.mark.parametrize("entry", ["src/a.py", "src/", "src/**/*.py", "./docs", "src/../lib/x.py", ".", "a b.txt",
                                   ".github/workflows/ci.yml"])
def test_modifies_inside_the_repository_is_fine(tmp_path: Path, entry: str) -> None:
    import json

    spec = _parse_ok(tmp_path, "S01-a.md", f"---\nmodifies: [{json.dumps(entry)}]\n---\nDo it.\n")

    assert spec.modifies == [entry]


def test_a_spec_that_is_a_symlink_out_of_its_directory_is_refused_unread(tmp_path: Path) -> None:
    specs, outside = tmp_path / "shop", tmp_path / "outside.md"
    specs.mkdir()
    outside.write_text("---\ntask_id: S09\n---\nTOPSECRET\n", encoding="utf-8")
    (specs / "S01-a.md").symlink_to(outside)

    spec, errors = parse_spec(specs / "S01-a.md")

    assert spec is None
    assert [(e.path, e.field) for e in errors] == [(str(specs / "S01-a.md"), "file")]
    assert "symbolic link" in errors[0].message and "TOPSECRET" not in str(errors[0])


def test_a_spec_linked_to_another_file_of_its_directory_is_read(tmp_path: Path) -> None:
    _write(tmp_path, "S01-a.md", "---\npriority: 1\n---\nDo it.\n")
    (tmp_path / "S02-b.md").symlink_to(tmp_path / "S01-a.md")

    spec, errors = parse_spec(tmp_path / "S02-b.md")

    assert errors == [] and spec is not None
    assert (spec.task_id, spec.priority) == ("S02-b", 1)


def _refused(path: Path, field: str, errors=None) -> str:
    """Parse `path` (unless its errors are given): no spec, one error on `field`; returns its message."""
    spec, errors = parse_spec(path) if errors is None else (None, errors)
    assert spec is None
    assert [(e.path, e.field) for e in errors] == [(str(path), field)]
    return errors[0].message


def test_a_front_matter_over_64_kib_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01-a.md", f"---\nnotes: {'x' * 70_000}\n---\nDo it.\n")

    assert "64 KiB" in _refused(path, "front matter")


def test_a_spec_over_1_mib_is_an_error_without_reading_it_whole(tmp_path: Path) -> None:
    import tracemalloc

    path = _write(tmp_path, "S01-a.md", "---\n---\nDo it.\n")
    with open(path, "r+b") as handle:
        handle.truncate(64 << 20)  # sparse; the bad-input suite tries 2 GiB under a memory cap

    tracemalloc.start()
    try:
        spec, errors = parse_spec(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated: the file was read whole"
    assert spec is None and "1 MiB" in _refused(path, "file", errors)


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path: Path) -> None:
    # five levels (59,049 strings) keep a regression here harmless; the bad-input suite runs nine levels
    # (387 million) under a memory cap
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 5)]
    path = _write(tmp_path, "S01-a.md", "---\n" + "\n".join(lines) + "\nlabels: *a4\n---\nDo it.\n")

    assert "alias" in _refused(path, "front matter")


def test_a_merge_key_alias_is_refused_too(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01-a.md", "---\nbase: &b {priority: 1}\nx:\n  <<: *b\n---\nDo it.\n")

    assert "alias" in _refused(path, "front matter")


def test_globs_with_stars_are_no_aliases(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-a.md", "---\nmodifies: ['src/*.py', 'docs/**']\n---\nDo it.\n")

    assert spec.modifies == ["src/*.py", "docs/**"]


@pytest.mark.parametrize(("line", "field"), [
    (f"executor: [{'y' * 50_000}]", "executor"),
    (f"labels: [{{k: {'k' * 50_000}}}]", "labels"),
    (f"priority: {'9' * 3000}", "priority"),
])
def test_a_long_bad_value_is_cut_in_the_message(tmp_path: Path, line: str, field: str) -> None:
    _, errors = parse_spec(_write(tmp_path, "S01-a.md", f"---\n{line}\n---\nDo it.\n"))

    assert [e.field for e in errors] == [field]
    assert len(errors[0].message) < 300 and "…" in errors[0].message


def test_an_int_past_pythons_digit_limit_is_a_front_matter_error_not_a_crash(tmp_path: Path) -> None:
    path = _write(tmp_path, "S01-a.md", f"---\npriority: {'9' * 5000}\n---\nDo it.\n")

    _refused(path, "front matter")


def test_env_sets_text_variables_for_the_spec(tmp_path: Path) -> None:
    spec = _parse_ok(tmp_path, "S01-x.md", "---\nenv: {APP_ENV: test, WORKERS: 4, DEBUG: false}\n---\n## Goal\nx\n")
    assert spec.env == {"APP_ENV": "test", "WORKERS": "4", "DEBUG": "false"}


@pytest.mark.parametrize("env, problem", [
    ("APP_ENV=test", "must be a mapping"),
    ({"1BAD": "x"}, "is not a variable name"),
    ({"DISPATCH_TASK_ID": "x"}, "DISPATCH_* variables are set by the dispatcher"),
    ({"NESTED": {"a": 1}}, "must be a text, number or true/false"),
    ({"EMPTY": None}, "must be a text, number or true/false"),
    ({f"V{i}": "x" for i in range(65)}, "at most 64"),
])
def test_a_bad_env_is_an_error_naming_file_and_field(tmp_path: Path, env, problem: str) -> None:
    import yaml

    path = _write(tmp_path, "S01-x.md", f"---\n{yaml.safe_dump({'env': env})}---\n## Goal\nx\n")
    spec, errors = parse_spec(path)
    assert [e.field for e in errors] == ["env"] and problem in errors[0].message
    assert str(path) in str(errors[0])


def test_a_longer_fence_is_closed_only_by_a_fence_as_long(tmp_path: Path) -> None:
    text = ("---\nkind: agent\n---\n## Reproduce\n````text\n```\n## Acceptance criteria\n- [ ] `rm -rf ~`\n```\n"
            "````\n\n## Acceptance criteria\n- [ ] `pytest -q`\n")
    assert _parse_ok(tmp_path, "S01-a.md", text).acceptance == ["pytest -q"]


# Names a spec's env may not set: which program runs, or where an agent sends its key (issue 19, item 2).
# Env names are case-sensitive on Linux; the suffixes are refused in any case (some tools read lower-case ones).
@pytest.mark.parametrize("name", [
    "PATH", "HOME", "LD_PRELOAD", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "NODE_OPTIONS", "PYTHONPATH",
    "PYTHONSTARTUP", "ANTHROPIC_BASE_URL", "anthropic_base_url", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY",
    "openai_api_key", "ANTHROPIC_AUTH_TOKEN", "GITHUB_TOKEN", "Github_Token", "IS_SANDBOX", "HTTPS_PROXY",
    "https_proxy", "NODE_EXTRA_CA_CERTS", "CODEX_HOME", "CLAUDE_CONFIG_DIR", "TOKEN",
])
def test_a_spec_env_may_not_set_what_decides_where_an_agent_runs_or_sends_its_key(tmp_path: Path,
                                                                                  name: str) -> None:
    path = _write(tmp_path, "S01-x.md", f"---\nenv: {{APP_ENV: test, {name}: x}}\n---\n## Goal\nx\n")
    spec, errors = parse_spec(path)
    assert [e.field for e in errors] == ["env"], errors
    assert f"may not set {name}:" in errors[0].message and str(path) in str(errors[0])
    assert "dispatch models / AgentModel" in errors[0].message, "the message says where endpoints and keys go"


def test_a_spec_env_naming_several_protected_variables_is_refused_naming_each(tmp_path: Path) -> None:
    text = ("---\nexecutor: claude\nenv: {ANTHROPIC_BASE_URL: 'http://169.254.169.254/steal', "
            "NODE_OPTIONS: '--require ./x.js', APP_ENV: test}\n---\n## Goal\nx\n")
    spec, errors = parse_spec(_write(tmp_path, "S01-x.md", text))
    assert [e.field for e in errors] == ["env"]
    assert "ANTHROPIC_BASE_URL, NODE_OPTIONS" in errors[0].message and "169.254" not in errors[0].message


@pytest.mark.parametrize("name", ["NODE_ENV", "APP_ENV", "DATABASE_URL", "LANG_CODE", "PY_VERSION", "TOKENS_MAX"])
def test_a_spec_env_keeps_ordinary_project_variables(tmp_path: Path, name: str) -> None:
    assert _parse_ok(tmp_path, "S01-x.md", f"---\nenv: {{{name}: x}}\n---\n## Goal\nx\n").env == {name: "x"}


def test_every_variable_of_a_built_in_model_is_refused_in_a_spec_env(tmp_path: Path) -> None:
    from dispatch.core.model_catalog import BUILTIN_MODELS, model_variables
    from dispatch.core.specs import env_problem

    names = model_variables(BUILTIN_MODELS)
    assert {"ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ZAI_API_KEY", "OPENAI_API_KEY"} <= names
    assert all(env_problem([name]) for name in names)


def test_a_configured_models_variables_are_refused_once_the_run_knows_them(tmp_path: Path) -> None:
    from dispatch.core.model_catalog import ModelSpec, model_variables
    from dispatch.core.specs import model_env_errors

    bedrock = ModelSpec("bedrock", ("claude", "-p"), {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "eu-west-1"},
                        key_env="AWS_SECRET_ACCESS_KEY")
    plain = _parse_ok(tmp_path, "S01-x.md", "---\nenv: {AWS_REGION: us-east-1}\n---\n## Goal\nx\n")
    other = _parse_ok(tmp_path, "S02-y.md", "---\nenv: {APP_ENV: test}\n---\n## Goal\nx\n")
    errors = model_env_errors([plain, other], model_variables({"bedrock": bedrock}))
    assert [(e.path, e.field) for e in errors] == [(str(plain.path), "env")]
    assert "may not set AWS_REGION" in errors[0].message


def test_a_spec_env_refusing_many_names_keeps_its_message_short(tmp_path: Path) -> None:
    names = ", ".join(f"V{i}_{'X' * 100}_TOKEN: x" for i in range(64))
    spec, errors = parse_spec(_write(tmp_path, "S01-x.md", f"---\nenv: {{{names}}}\n---\n## Goal\nx\n"))
    assert [e.field for e in errors] == ["env"] and "and 56 more" in errors[0].message
    assert len(errors[0].message) < 1500
