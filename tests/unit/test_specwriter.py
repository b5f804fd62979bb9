"""L1's specs from its scan: they validate, score well, batch files, name their dependencies, and their
acceptance commands really run (failing on the unfixed code, passing once the gaps are gone)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dispatch.core.dag import load_project
from dispatch.pipeline.analyze import scan_code
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.quality import score_spec
from dispatch.pipeline.specwriter import draft_specs
from tests.fixtures.projects import write_tree

SECRET = "tok-9f8e7d6c5b4a39281706"
TREE = {
    "app/a.py": "from app.d import helper\n\ndef handler():\n    pass\n",
    "app/b.py": "# TODO: paginate\nITEMS = []\n",
    "app/c.py": f"PASSWORD = '{SECRET}'\n",
    "app/d.py": "def helper():\n    raise NotImplementedError\n",
    "web/app.js": "import { get } from './util.js'\n// FIXME: retry\nconst API = 'http://localhost:8000'\n",
    "web/util.js": "export function get() {}\n",
    "tests/test_a.py": "def test_a():\n    assert True\n",
}


@pytest.fixture
def code(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "code", TREE)


def _write(tmp_path: Path, drafts) -> Path:
    return write_tree(tmp_path / "generated", {draft.name: draft.text for draft in drafts})


def test_one_spec_per_batch_with_its_files_and_their_dependencies(tmp_path: Path, code: Path) -> None:
    drafts, notes = draft_specs(scan_code(code).findings, code, PipelineConfig())
    assert notes == []
    assert [(d.task_id, d.files) for d in drafts] == [
        ("S01-a-b-c", ["app/a.py", "app/b.py", "app/c.py"]), ("S02-d", ["app/d.py"]),
        ("S03-app-util", ["web/app.js", "web/util.js"])]
    assert [d.depends_on for d in drafts] == [["S02-d"], [], []], "app/a.py imports app/d.py"
    project = load_project("shop.pipeline", _write(tmp_path, drafts))
    assert project.specs["S01-a-b-c"].modifies == ["app/a.py", "app/b.py", "app/c.py"]
    assert project.specs["S01-a-b-c"].depends_on == ["S02-d"]
    assert project.specs["S01-a-b-c"].models == ["glm", "minimax", "claude"]
    assert project.specs["S01-a-b-c"].verify == ["codex"]
    assert project.specs["S01-a-b-c"].priority == 1, "a secret in the batch"


def test_the_specs_pass_the_quality_gate(tmp_path: Path, code: Path) -> None:
    drafts, _ = draft_specs(scan_code(code).findings, code, PipelineConfig())
    project = load_project("shop.pipeline", _write(tmp_path, drafts))
    scores = {t: score_spec(spec) for t, spec in project.specs.items()}
    assert {t: (s.score, [b.rule for b in s.broken]) for t, s in scores.items()} == {
        t: (100, []) for t in project.specs}


def test_no_secret_reaches_a_spec(code: Path) -> None:
    drafts, _ = draft_specs(scan_code(code).findings, code, PipelineConfig())
    assert all(SECRET not in d.text for d in drafts)
    assert "PASSWORD = '***'" in drafts[0].text


def test_acceptance_commands_run_fail_on_the_gaps_and_pass_once_they_are_fixed(tmp_path: Path, code: Path) -> None:
    config = PipelineConfig.model_validate({"regression": {"command": "test -f tests/test_a.py"}})
    drafts, _ = draft_specs(scan_code(code).findings, code, config)
    project = load_project("shop.pipeline", _write(tmp_path, drafts))

    def results(task_id: str) -> list[int]:
        return [subprocess.run(["bash", "-c", c], cwd=code, capture_output=True).returncode
                for c in project.specs[task_id].acceptance]

    assert project.specs["S02-d"].acceptance == ["python3 -m py_compile app/d.py",
                                                 "! grep -nE 'NotImplemented' app/d.py",
                                                 'PATH="$PWD/.venv/bin:$PATH" ' + config.regression.command]
    assert results("S02-d")[1] != 0 and results("S03-app-util")[0] != 0, "the gaps are still there"
    (code / "app" / "d.py").write_text("def helper():\n    return 1\n")
    (code / "web" / "app.js").write_text("import { get } from './util.js'\nconst API = process.env.APP_URL\n")
    assert results("S02-d") == [0, 0, 0]
    assert results("S03-app-util") == [0, 0, 0]


def test_files_whose_names_cannot_be_quoted_are_left_out_and_named(tmp_path: Path, code: Path) -> None:
    (code / "app" / "we`ird $(x).py").write_text("# TODO\n")
    drafts, notes = draft_specs(scan_code(code).findings, code, PipelineConfig())
    assert all("we`ird" not in d.text for d in drafts)
    assert len(notes) == 1 and "left out" in notes[0]


def test_the_test_command_runs_with_the_projects_venv_not_the_nodes_python(tmp_path: Path, code: Path) -> None:
    # L2 builds <code>/.venv (backend.install) before its specs run; their acceptance must use it
    venv_bin = code / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("#!/bin/sh\necho the venv python \"$@\"\n")
    (venv_bin / "python").chmod(0o755)
    config = PipelineConfig.model_validate({"regression": {"command": "python -m pytest -q"}})
    drafts, _ = draft_specs(scan_code(code).findings, code, config)
    project = load_project("shop.pipeline", _write(tmp_path, drafts))
    test_command = project.specs["S02-d"].acceptance[-1]
    ran = subprocess.run(["/bin/bash", "-c", test_command], cwd=code, capture_output=True, text=True,
                         env={"PATH": "/nonexistent"})  # the node's PATH has no python at all
    assert ran.returncode == 0 and ran.stdout == "the venv python -m pytest -q\n", ran.stderr
