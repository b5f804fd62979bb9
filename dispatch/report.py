"""The project report: totals, success rate, a row per spec, and each failure with its log tail.

Rendered from the state file (and run directories) alone, so `dispatch report` works offline and
the same markdown is attached to the flow run as a Prefect artifact.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from dispatch.results import ProjectState

_TAIL_LINES = 20


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _seconds(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "-"


def log_tail(path: str, lines: int = _TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' when it is gone)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def table_rows(state: ProjectState) -> list[dict]:
    """One dict per spec: the table artifact and `report --json` rows."""
    return [
        {"spec": task_id, "state": row.state + (" (cached)" if row.cached else ""), "node": row.node or "-",
         "model": row.model or "-", "attempts": row.attempts, "duration_s": round(row.duration or 0.0, 2),
         "exit_code": row.exit_code, "reason": row.reason}
        for task_id, row in state.specs.items()
    ]


def render_markdown(state: ProjectState, runs_dir: Path | None = None, ui_links: bool = False) -> str:
    """The report as markdown.

    Args:
        state: the run's state file.
        runs_dir: where the run directories are.
        ui_links: link each spec to its latest task run in the Prefect UI (its logs), by a path relative to
            the UI's root: the report artifact is read there, whatever address the UI has.
    """
    counts = state.counts()
    total = len(state.specs)
    done = counts.get("succeeded", 0)
    rate = 100.0 * done / total if total else 0.0
    wall = (state.ended_at or state.updated_at) - state.started_at
    lines = [
        f"# Oyster Dispatch report: {state.project}",
        "",
        f"- run `{state.run_id}` by {state.user or '-'} on {state.host or '-'}, started {_when(state.started_at)}, "
        f"state **{state.state}**",
        f"- specs: {total}; succeeded {done} ({rate:.0f}%), failed {counts.get('failed', 0)}, "
        f"not run {counts.get('not_run', 0)}, cancelled {counts.get('cancelled', 0)}, "
        f"cached {sum(1 for r in state.specs.values() if r.cached)}",
        f"- wall time: {wall:.1f}s",
        "",
        "| spec | state | node | model | attempts | duration | exit | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(state):
        reason = (row["reason"] or "").replace("|", "\\|").replace("\n", " ")[:120]
        task_run = state.specs[row["spec"]].task_run_id if ui_links else None
        spec = f"[{row['spec']}](/runs/task-run/{task_run})" if task_run else row["spec"]
        lines.append(f"| {spec} | {row['state']} | {row['node']} | {row['model']} | {row['attempts']} | "
                     f"{row['duration_s']:.1f}s | {row['exit_code'] if row['exit_code'] is not None else '-'} | "
                     f"{reason} |")
    failures = [(t, r) for t, r in state.specs.items() if r.state == "failed"]
    if failures:
        lines += ["", "## Failures"]
        for task_id, row in failures:
            lines += ["", f"### {task_id}", "", f"{row.reason}", "", "```", log_tail(row.log_path) or "(no log)", "```"]
    return "\n".join(lines) + "\n"
