"""Duration estimates from history: the spec's own runs, the project's median, the model's, kept bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatch.core.durations import DurationHistory, history_path
from dispatch.core.errors import UnsafePath
from dispatch.core.specs import Spec


def _spec(task_id: str, **fields: object) -> Spec:
    return Spec(task_id=task_id, path=Path(f"/specs/demo/{task_id}.md"), body="Do it.\n", **fields)  # type: ignore[arg-type]


def _specs(*ids: str, **fields: object) -> dict[str, Spec]:
    return {task_id: _spec(task_id, **fields) for task_id in ids}


def test_a_spec_is_estimated_by_the_median_of_its_own_successful_runs(tmp_path: Path) -> None:
    history = DurationHistory.load(tmp_path, "demo")
    for seconds in (10.0, 30.0, 20.0):
        history.record("S01", seconds, succeeded=True, model="glm")
    history.record("S01", 500.0, succeeded=False, model="glm")  # a failed attempt (a timeout) is no estimate

    assert history.estimates(_specs("S01")) == {"S01": 20.0}


def test_a_spec_that_never_succeeded_is_estimated_by_its_attempts(tmp_path: Path) -> None:
    history = DurationHistory.load(tmp_path, "demo")
    history.record("S01", 40.0, succeeded=False)
    history.record("S01", 60.0, succeeded=False)

    assert history.estimates(_specs("S01")) == {"S01": 50.0}


def test_a_first_run_falls_back_to_the_project_median(tmp_path: Path) -> None:
    history = DurationHistory.load(tmp_path, "demo")
    for task_id, seconds in (("S01", 10.0), ("S02", 100.0), ("S03", 40.0)):
        history.record(task_id, seconds, succeeded=True)

    assert history.estimates(_specs("S01", "S02", "S03", "S04-new"))["S04-new"] == 40.0


def test_a_project_without_history_uses_the_models_median_from_other_projects(tmp_path: Path) -> None:
    other = DurationHistory.load(tmp_path, "other")
    for seconds in (100.0, 300.0, 200.0):
        other.record("S01", seconds, succeeded=True, model="claude")
    other.record("S02", 5.0, succeeded=True, model="shell")
    other.save()

    history = DurationHistory.load(tmp_path, "demo")
    specs = {"A": _spec("A", executor="claude"), "B": _spec("B", kind="shell"), "C": _spec("C", executor="codex")}

    assert history.estimates(specs) == {"A": 200.0, "B": 5.0}  # codex: no history anywhere, no estimate


def test_the_history_survives_a_save_and_keeps_only_the_last_runs(tmp_path: Path) -> None:
    history = DurationHistory.load(tmp_path, "demo")
    for seconds in range(1, 9):
        history.record("S01", float(seconds), succeeded=True)
    history.save()

    again = DurationHistory.load(tmp_path, "demo")

    assert [r["seconds"] for r in again.runs["S01"]] == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert history_path(tmp_path, "demo") == tmp_path / "demo" / "durations.json"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"specs": {"S01": "fast", "../x": [{"seconds": 1}]}}),
                                     json.dumps({"specs": {"S01": [{"seconds": True}, {"seconds": -4},
                                                                   {"seconds": "9"}]}}),
                                     json.dumps([1, 2, 3])])
def test_a_damaged_history_is_ignored_not_an_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "durations.json").write_text(content)

    history = DurationHistory.load(tmp_path, "demo")

    assert history.runs == {}
    assert history.estimates(_specs("S01")) == {}


def test_an_oversized_history_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dispatch.core.durations as durations

    history = DurationHistory.load(tmp_path, "demo")
    history.record("S01", 3.0, succeeded=True)
    history.save()
    monkeypatch.setattr(durations, "_MAX_BYTES", 10)

    assert DurationHistory.load(tmp_path, "demo").runs == {}


def test_a_project_name_that_is_no_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePath):
        DurationHistory.load(tmp_path, "../etc")
