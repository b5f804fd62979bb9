"""The live progress view of `dispatch start`: done / total, running, failed, and the estimated time left."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from dispatch.cli.main import _progress_listener
from dispatch.core.results import SpecResult


def _rendered(events: list[tuple[str, str, dict]]) -> str:
    console = Console(record=True, width=120, force_terminal=False)
    progress, listener = _progress_listener(5, console=console)
    for event, task_id, details in events:
        listener(event, task_id, details)
    console.print(progress.get_renderable())
    return console.export_text()


def _result(task_id: str) -> SpecResult:
    return SpecResult(project="demo", task_id=task_id, status="succeeded", node="local", duration=1.5,
                      log_path=str(Path("/tmp/x")))


def test_the_view_shows_done_of_total_running_failed_and_the_time_left() -> None:
    text = _rendered([
        ("started", "S01", {"progress": {"total": 5, "done": 0, "running": 1, "failed": 0, "remaining_s": 200.0}}),
        ("started", "S02", {"progress": {"total": 5, "done": 0, "running": 2, "failed": 0, "remaining_s": 200.0}}),
        ("succeeded", "S01", {"result": _result("S01"), "cached": False,
                              "progress": {"total": 5, "done": 1, "running": 1, "failed": 0, "remaining_s": 150.0}}),
        ("failed", "S02", {"reason": "exit 1",
                           "progress": {"total": 5, "done": 2, "running": 0, "failed": 1, "remaining_s": 125.0}}),
    ])

    assert "2/5" in text
    assert "0 running" in text and "1 failed" in text
    assert "2:0" in text and "left" in text  # ~2:05 left (a second may pass while rendering)


def test_without_any_measured_duration_the_view_says_it_is_estimating() -> None:
    text = _rendered([("started", "S01", {"progress": {"total": 5, "done": 0, "running": 1, "failed": 0,
                                                       "remaining_s": None}})])

    assert "0/5" in text and "1 running" in text and "estimating" in text
