"""`dispatch validate <project> --score`: per-spec scores and broken rules, as a table or JSON, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.fixtures.projects import DISPATCH, write_spec
from tests.unit.test_quality import GOOD


def _dispatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCH, *args], capture_output=True, text=True, timeout=60, env=os.environ.copy())


def _project(isolated_home: Path) -> Path:
    specs = isolated_home / "specs" / "scored"
    (specs / "S02-cart-api.md").parent.mkdir(parents=True)
    (specs / "S02-cart-api.md").write_text(GOOD.replace("depends_on: [S01-db]\n", "depends_on: [S01]\n"))
    write_spec(specs, "S01-db.md", {"task_id": "S01-db"}, "Fix stuff.\n")
    return specs


def test_score_prints_each_spec_score_and_the_rules_it_broke(isolated_home: Path) -> None:
    _project(isolated_home)
    result = _dispatch("validate", "scored", "--score")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    good = next(line for line in lines if "S02-cart-api" in line)
    bad = next(line for line in lines if "S01-db" in line)
    assert "100" in good
    assert "modifies" in result.stdout and "goal" in result.stdout and "acceptance" in result.stdout
    assert any(word.isdigit() and int(word) < 60 for word in bad.replace("│", " ").split())
    assert "average" in result.stdout


def test_score_as_json(isolated_home: Path) -> None:
    _project(isolated_home)
    result = _dispatch("validate", "scored", "--score", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    scores = {row["task_id"]: row for row in data["scores"]}
    assert scores["S02-cart-api"]["score"] == 100 and scores["S02-cart-api"]["broken"] == []
    broken = {b["rule"] for b in scores["S01-db"]["broken"]}
    assert {"goal", "acceptance", "modifies", "length"} <= broken
    assert data["average"] == (100 + scores["S01-db"]["score"]) / 2


def test_score_of_an_invalid_project_still_exits_2(isolated_home: Path) -> None:
    specs = _project(isolated_home)
    write_spec(specs, "S03-x.md", {"task_id": "S03-x", "depends_on": ["S09"]}, "## Goal\nx\n")
    result = _dispatch("validate", "scored", "--score")
    assert result.returncode == 2
    assert "S03-x.md: depends_on" in result.stderr
