"""The project report: totals, success rate, a row per spec, and each failure with its log tail.

Rendered from the state file (and run directories) alone, so `dispatch report` works offline and
the same markdown is attached to the flow run as a Prefect artifact.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from dispatch.core.results import ProjectState, SpecRow

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


def money(cost: float | None) -> str:
    """`$0.0400`, or `-` when no agent reported a cost."""
    return f"${cost:.4f}" if cost is not None else "-"


def total_money(costs: list[float | None]) -> float | None:
    """The total of costs as they are shown (each to $0.0001), so that a total agrees with the rows above it;
    None when none is known."""
    known = [round(cost, 4) for cost in costs if cost is not None]
    return round(sum(known), 4) if known else None


def model_text(row: SpecRow) -> str:
    """The model that did the work, and the ones passed over before it: `claude (after glm: quota until 14:05)`."""
    if not row.fallback:
        return row.model or "-"
    passed, _, _ = row.fallback.partition(" -> ")
    return f"{row.model or '-'} (after {passed})"


def _tokens(value: int | None) -> str:
    return f"{value:,}" if value is not None else "-"


def table_rows(state: ProjectState) -> list[dict]:
    """One dict per spec: the table artifact and `report --json` rows (usage: what this run's attempts of
    the spec reported; None where no agent reported it)."""
    return [
        {"spec": task_id, "state": row.state + (" (cached)" if row.cached else ""), "node": row.node or "-",
         "model": row.model or "-", "fallback": row.fallback, "attempts": row.attempts,
         "duration_s": round(row.duration or 0.0, 2),
         "cost_usd": row.cost_usd, "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
         "exit_code": row.exit_code, "reason": row.reason}
        for task_id, row in state.specs.items()
    ]


def usage_line(state: ProjectState) -> str:
    """`$0.0800 reported, 2,400 tokens in / 400 out; 1 attempt(s) reported no cost`: this run's usage."""
    rows = state.specs.values()
    cost = total_money([r.cost_usd for r in rows])
    tokens_in = sum(r.input_tokens or 0 for r in rows)
    tokens_out = sum(r.output_tokens or 0 for r in rows)
    unknown = sum(r.attempts_without_cost for r in rows)
    return (f"{money(cost)} reported, {tokens_in:,} tokens in / {tokens_out:,} out"
            + (f"; {unknown} attempt(s) reported no cost" if unknown else ""))


def _usage_section(usage: dict) -> list[str]:
    """The run's usage per model (and per user, when several), from the ledger's summary (dispatch.core.usage)."""
    lines = ["", "## Usage", "", "| model | attempts | cost | tokens in | tokens out | cache read | no cost reported |",
             "|---|---|---|---|---|---|---|"]
    for model, group in sorted(usage.get("by_model", {}).items()):
        known = group["attempts"] - group["attempts_without_cost"]
        lines.append(f"| {model} | {group['attempts']} | {money(group['cost_usd'] if known else None)} | "
                     f"{group['input_tokens']:,} | {group['output_tokens']:,} | {group['cache_read_tokens']:,} | "
                     f"{group['attempts_without_cost']} |")
    return lines


def render_markdown(state: ProjectState, runs_dir: Path | None = None, ui_links: bool = False,
                    usage: dict | None = None) -> str:
    """The report as markdown.

    Args:
        state: the run's state file.
        runs_dir: where the run directories are.
        ui_links: link each spec to its latest task run in the Prefect UI (its logs), by a path relative to
            the UI's root: the report artifact is read there, whatever address the UI has.
        usage: the run's attempts in the usage ledger, summarized (`dispatch.core.usage.summarize`): a table per model.
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
        f"- usage: {usage_line(state)}",
        "",
        "| spec | state | node | model | attempts | duration | cost | tokens in/out | exit | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(state):
        reason = (row["reason"] or "").replace("|", "\\|").replace("\n", " ")[:120]
        task_run = state.specs[row["spec"]].task_run_id if ui_links else None
        spec = f"[{row['spec']}](/runs/task-run/{task_run})" if task_run else row["spec"]
        model = model_text(state.specs[row["spec"]]).replace("|", "\\|")
        lines.append(f"| {spec} | {row['state']} | {row['node']} | {model} | {row['attempts']} | "
                     f"{row['duration_s']:.1f}s | {money(row['cost_usd'])} | {_tokens(row['input_tokens'])}/"
                     f"{_tokens(row['output_tokens'])} | {row['exit_code'] if row['exit_code'] is not None else '-'} | "
                     f"{reason} |")
    if usage and usage.get("attempts"):
        lines += _usage_section(usage)
    failures = [(t, r) for t, r in state.specs.items() if r.state == "failed"]
    if failures:
        lines += ["", "## Failures"]
        for task_id, row in failures:
            lines += ["", f"### {task_id}", "", f"{row.reason}", "", "```", log_tail(row.log_path) or "(no log)", "```"]
    return "\n".join(lines) + "\n"
