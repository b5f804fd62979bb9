"""Usage and cost per attempt, as the agents report it: the model, the ledger and its totals.

The node runner reads what each agent CLI prints (Claude Code's `result` event, Codex's `turn.completed`,
opencode's `step_finish`: `runner.events.UsageMeter`) into each attempt of `result.json`; a figure an agent did
not print stays unknown (None), never 0. The dispatcher appends one line per attempt to the ledger,
`<home>/results/usage.jsonl` (rotated to `usage.jsonl.1` past `DISPATCH_USAGE_LEDGER_BYTES`), from which
`totals()` sums cost and tokens per model, user, project and UTC day, and `dispatch.core.budgets.Budgets` keeps
a spec from starting when its model's or its user's spend today (UTC) would pass `DISPATCH_BUDGET_MODEL` /
`DISPATCH_BUDGET_USER`.

An agent's figures are its own output, so untrusted: a cost that is not a finite number from 0 to $10,000 per
attempt, or a token count that is not a whole number from 0 to 10^10 (`runner.events.USAGE_MAX_*`), is recorded
as unknown with a warning, by the runner (in task.log) and again here (a node may run an older runner), and a
ledger line with one counts it as unknown: no total, budget or `--json` output ever holds `inf` or `NaN`.

Token counts are what each CLI calls them: Claude's `input_tokens` leave out cache reads, Codex's include
them. Claude Code prices GLM and MiniMax (through `ANTHROPIC_BASE_URL`) at Anthropic's list prices.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator

from dispatch.runner.events import usage_figure

_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
LEDGER_NAME = "usage.jsonl"
MAX_SUM_COST_USD = 1e9  # a sum of attempts' costs (a spec's, a machine's day on one model): more is a bug
MAX_SUM_TOKENS = 10**15
logger = logging.getLogger(__name__)


def figure(value: Any, name: str = "cost_usd") -> float | int | None:
    """A usage figure of one attempt (`cost_usd` or a `*_tokens`) as counted: within its bound
    (`runner.events.usage_figure`); anything else is unknown (None)."""
    return usage_figure(name, value)[0]


class Usage(BaseModel):
    """What one attempt's agent said it used; None where it said nothing."""

    source: str = ""
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    agent_model: str = ""

    @field_validator("cost_usd", *_TOKEN_FIELDS, mode="before")
    @classmethod
    def figure(cls, value: Any, info: ValidationInfo) -> float | int | None:
        # a result.json from an older or odd runner must not fail the whole result: no figure is unknown
        checked, problem = usage_figure(info.field_name, value)
        if problem:
            logger.warning("an agent reported %s; recorded as unknown", problem)
        return checked

    def plus(self, other: Usage | None) -> Usage:
        """The sum of two usages; a figure unknown in both stays unknown."""
        if other is None:
            return self
        summed: dict[str, Any] = {}
        for name in ("cost_usd", *_TOKEN_FIELDS):
            mine, theirs = getattr(self, name), getattr(other, name)
            summed[name] = None if mine is None and theirs is None else (mine or 0) + (theirs or 0)
        return Usage.model_construct(**summed)  # checked figures summed: a sum may pass one attempt's bound


def total_figure(value: Any, whole: bool = False) -> float | int | None:
    """A sum of usage figures as read back (a state file's row, a machine's published day): a finite number
    from 0 to `MAX_SUM_COST_USD` (`whole`: an integer from 0 to `MAX_SUM_TOKENS`), else unknown (None). A sum is
    bound far above one attempt's figures, but bound: an older dispatcher may have summed unchecked ones."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not 0 <= value <= (MAX_SUM_TOKENS if whole else MAX_SUM_COST_USD) or (whole and value != int(value)):
        return None
    return int(value) if whole else float(value)


def utc_day(ts: float) -> str:
    """`YYYY-MM-DD` of Unix time `ts` in UTC: the budgets' day."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def next_utc_midnight(ts: float) -> float:
    day = dt.datetime.fromtimestamp(ts, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + dt.timedelta(days=1)).timestamp()


def ledger_path(results_dir: Path) -> Path:
    return results_dir / LEDGER_NAME


def agent_ran(attempt: Any) -> bool:
    """Whether an attempt (results.Attempt) ran an agent: not a shell step, not a CLI that was missing or could
    not start (no exit code and nothing reported), so its usage, known or not, counts."""
    if not attempt.model or not attempt.verdict or attempt.role == "shell":
        return False
    return attempt.exit_code is not None or attempt.usage is not None


def ledger_records(result: Any, *, user: str, run_id: str, clock: Callable[[], float] = time.time) -> list[dict]:
    """One ledger line per agent attempt of `result` (a SpecResult), usage or not (unknown counts too)."""
    records = []
    for number, attempt in enumerate(result.attempts, 1):
        if not agent_ran(attempt):
            continue
        usage = attempt.usage.model_dump(exclude_none=True) if attempt.usage else {}
        ts = attempt.ended_at or attempt.started_at or clock()
        records.append({"ts": ts, "day": utc_day(ts), "project": result.project, "task_id": result.task_id,
                        "run_id": run_id, "attempt": f"{result.attempt}.{number}", "user": user,
                        "node": result.node, "model": attempt.model, "role": attempt.role or "agent",
                        "verdict": attempt.verdict, **usage})
    return records


def append_ledger(results_dir: Path, records: Iterable[dict], max_bytes: int) -> None:
    """Append `records` to the ledger under a lock (dispatchers on one machine share it); past `max_bytes`
    the ledger first becomes `usage.jsonl.1` (the one before that is dropped)."""
    lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if not lines:
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    path = ledger_path(results_dir)
    with open(results_dir / f".{LEDGER_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists() and path.stat().st_size + len(lines) > max_bytes:
                os.replace(path, path.with_name(LEDGER_NAME + ".1"))
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(lines)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def parse_ledger(text: str, contains: str = "") -> list[dict]:
    records = []
    for line in text.splitlines():
        if contains not in line:  # a cheap filter before the JSON parse
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("ts"), int | float):
            records.append(record)
    return records


def read_ledger(results_dir: Path, contains: str = "") -> list[dict]:
    """Every ledger record (whose line holds `contains`), the rotated file's first; a torn or foreign line is
    skipped."""
    records = []
    for path in (ledger_path(results_dir).with_name(LEDGER_NAME + ".1"), ledger_path(results_dir)):
        try:
            records += parse_ledger(path.read_text(encoding="utf-8", errors="replace"), contains)
        except OSError:
            continue
    return records


def _empty() -> dict[str, Any]:
    return {"cost_usd": 0.0, **dict.fromkeys(_TOKEN_FIELDS, 0), "attempts": 0, "attempts_without_cost": 0}


def _add(group: dict[str, Any], cost: float | None, tokens: list[int]) -> None:
    group["attempts"] += 1
    if cost is None:
        group["attempts_without_cost"] += 1
    else:
        group["cost_usd"] = round(group["cost_usd"] + cost, 6)
    for name, count in zip(_TOKEN_FIELDS, tokens, strict=True):
        group[name] += count


def summarize(records: Iterable[dict], by: tuple[str, ...] = ("model", "user", "project", "day")) -> dict[str, Any]:
    """Totals of ledger `records`: overall and per each record field of `by` (`by_model`, `by_user`, ...)."""
    total = _empty()
    groups: dict[str, dict[str, dict[str, Any]]] = {f"by_{key}": {} for key in by}
    for record in records:
        cost = figure(record.get("cost_usd"))
        tokens = [figure(record.get(name), name) or 0 for name in _TOKEN_FIELDS]
        _add(total, cost, tokens)
        for key in by:
            _add(groups[f"by_{key}"].setdefault(str(record.get(key) or "-"), _empty()), cost, tokens)
    return {**total, **groups}


def totals(settings: Any, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """What the agents reported using, from this machine's ledger, summed overall and per model, user, project
    and UTC day: `cost_usd` and the token counts (only figures the agents printed), `attempts`, and
    `attempts_without_cost` (attempts whose agent printed no cost: Codex, plain opencode, a killed run).

    Args:
        settings: the DispatchSettings (its `results_dir` holds the ledger).
        since: count attempts that ended at or after this Unix time (default: the start of today, UTC).
        until: and before this one (default: no end).

    Returns:
        {"since", "until", "cost_usd", "input_tokens", ..., "attempts", "attempts_without_cost",
        "by_model": {model: {...same figures}}, "by_user": ..., "by_project": ..., "by_day": ...}

    Examples:
        >>> totals(get_settings())["by_model"].get("claude", {}).get("cost_usd", 0.0)
    """
    now = time.time()
    since = next_utc_midnight(now) - 86400 if since is None else since
    chosen = [r for r in read_ledger(settings.results_dir) if r["ts"] >= since and (until is None or r["ts"] < until)]
    return {"since": since, "until": until, **summarize(chosen)}


def budget_use(settings: Any, today: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Each configured daily budget beside what this machine's ledger shows spent today.

    Args:
        settings: the DispatchSettings (`budget_model`, `budget_user`).
        today: `totals(settings)` for today.

    Returns:
        {"model": {name: {"limit_usd", "spent_usd"}}, "user": {...}}.
    """
    return {
        "model": {m: {"limit_usd": limit, "spent_usd": today["by_model"].get(m, {}).get("cost_usd", 0.0)}
                  for m, limit in settings.budget_model.items()},
        "user": {u: {"limit_usd": limit, "spent_usd": today["by_user"].get(u, {}).get("cost_usd", 0.0)}
                 for u, limit in settings.budget_user.items()},
    }


def run_usage(settings: Any, run_id: str) -> dict[str, Any]:
    """The summary (`summarize`, per model and user) of one dispatcher run's attempts in the ledger: the report's
    usage table."""
    if not run_id:
        return summarize([])
    # the ledger is written compactly: its lines of this run hold this text (the filter skips the JSON parse of
    # the others; the exact match below decides)
    lines = read_ledger(settings.results_dir, contains=json.dumps({"run_id": run_id}, separators=(",", ":"))[1:-1])
    return summarize((r for r in lines if r.get("run_id") == run_id), by=("model", "user"))
